"""AttnLRP on the embedded SmolLM2-135M: deleting the tokens it calls most relevant first lowers the
predicted token's logit faster than deleting them in random order (averaged over real prompts)."""

import pathlib
import time

import pytest
import torch

from lucidlm.bench.faithfulness import evaluate, load_prompts, replacement_id
from lucidlm.errors import ModelNotInstalledError

PROMPTS = pathlib.Path(__file__).parent / "data" / "faithfulness_prompts.txt"


@pytest.fixture(scope="module")
def smollm2():
    import lucidlm

    try:
        llm = lucidlm.LLM.load()
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    llm.model.eval()
    return llm


def test_prompt_file_is_the_packaged_one():
    prompts = load_prompts(PROMPTS)
    assert len(prompts) >= 20 and all(p.strip() == p for p in prompts)
    assert load_prompts() == prompts  # the bench ships the same prompts inside the package


def test_attnlrp_deletes_evidence_faster_than_random(smollm2):
    t0 = time.perf_counter()
    prompts = load_prompts(PROMPTS)
    scores = evaluate(smollm2.model, smollm2.tokenizer, prompts, ("attnlrp", "random"),
                      replacement_id(smollm2.tokenizer, " "), n_random=1, lerf=False)
    lrp, rnd = scores["attnlrp"], scores["random"]
    assert lrp.scale == rnd.scale and all(map(torch.isfinite, map(torch.tensor, lrp.morf)))
    wins = sum(a < b for a, b in zip(lrp.morf, rnd.morf))
    print(f"MoRF area: attnlrp {lrp.area('morf'):.3f}, random {rnd.area('morf'):.3f}; "
          f"attnlrp lower on {wins}/{len(prompts)} prompts; {time.perf_counter() - t0:.0f} s")
    assert lrp.area("morf") < rnd.area("morf") - 0.1  # a clear gap, not noise
    assert wins > len(prompts) / 2

"""``lucidlm bench faithfulness`` on the embedded SmolLM2-135M: every method explains the model's own
top next token, and AttnLRP ranks the evidence first (the metrics themselves are checked against
hand-computed curves in test_evaluate.py)."""

import pathlib

import pytest
import torch

from lucidlm.bench.faithfulness import bench, format_row, load_prompts

PROMPTS = pathlib.Path(__file__).parent / "data" / "faithfulness_prompts.txt"


def test_prompt_file_is_the_packaged_one():
    prompts = load_prompts(PROMPTS)
    assert len(prompts) >= 20 and all(p.strip() == p for p in prompts)
    assert load_prompts() == prompts  # the bench ships the same prompts inside the package


def test_attnlrp_removes_the_evidence_first_on_the_real_model(smollm2):
    prompts = ["The capital of Japan is", "The chemical symbol for gold is"]
    rows = {r.method: r for r in bench(smollm2, prompts, ["attnlrp", "random"])}
    for method, row in rows.items():
        assert row.error is None and row.seconds > 0 and format_row(row).split()[0] == method
    lrp = rows["attnlrp"].result
    # every method explains the model's top next token: the intact prompt's score is its top probability
    for prompt, ex in zip(prompts, lrp.examples):
        with torch.no_grad():
            probs = smollm2.model(torch.tensor([smollm2.tokenizer.encode(prompt)]))[0, -1].double().softmax(-1)
        assert ex.full_score == pytest.approx(float(probs.max()), rel=1e-5)
        assert ex.metrics["deletion"] < ex.metrics["insertion"]  # removing its top tokens hurts most
    assert [e.full_score for e in rows["random"].result.examples] == pytest.approx([e.full_score for e in lrp.examples])
    assert lrp.mean["abpc"] > rows["random"].result.mean["abpc"]
    assert lrp.mean["comprehensiveness"] > rows["random"].result.mean["comprehensiveness"]

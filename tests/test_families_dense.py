"""Dense families of issue 26 (Starcoder2, ...) beyond what every family gets from
tests/test_parity.py, test_check.py and test_explain.py (logits, saving back, prefill + decode,
conservation checks, both LRP methods): greedy tokens through our KV cache equal transformers'
``generate`` (the oracle)."""

import pytest
import torch

import lucidlm
from lucidlm.generate import generate_ids

NEW_FAMILIES = ["starcoder2"]
PROMPT = [5, 17, 3, 42, 8, 11, 60, 23]  # longer than starcoder2's window of 5
N_NEW = 12


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_cached_greedy_tokens_equal_transformers_generate(family, hf_checkpoint):
    hf_model, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    ours = [step[0] for step in generate_ids(llm.model, [PROMPT], N_NEW)]
    assert ours == hf_greedy(hf_model, PROMPT, N_NEW)

"""Run by ``torchrun`` in tests/test_tensor_parallel.py: loads a checkpoint with
``tensor_parallel=True`` and writes what every process generated and explained to
``OUT/rank<r>.json``, for the test to compare with one process's results.

Usage: ``torchrun --standalone --nproc-per-node 2 tests/tp_worker.py CHECKPOINT_DIR OUT_DIR``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from lucidlm import LLM
from lucidlm.cache.policies import build_cache
from lucidlm.distributed import closing_group

PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see the river"
#: policies whose choice averages over all KV groups (every process must keep the same tokens)
POLICIES = (("dense", None), ("h2o", 8), ("snapkv", 8), ("knorm", 8), ("h2o-vlen", 8))
#: per-head policies: every process decides for its own KV groups, as one process decides for them
PER_HEAD = (("h2o(heads=each)", 8), ("knorm(heads=each)", 8))


def results(llm: LLM) -> dict:
    """Greedy generations through each cache policy and explanations with both LRP methods."""
    out = {"generate": {p: llm.generate(PROMPT, max_new_tokens=12, kv_cache=p, cache_tokens=n)
                        for p, n in POLICIES + PER_HEAD},
           "kept": {p: kept_positions(llm, p, n) for p, n in POLICIES[1:]},
           "kept_by_head": {p: [[sorted(h) for h in layer] for layer in streamed(llm, p, n).kept_by_head()]
                            for p, n in PER_HEAD}}
    for method in ("attnlrp", "cp-lrp", "attention-rollout", "integrated-gradients"):
        e = llm.explain(PROMPT, method=method, options={"steps": 32} if method == "integrated-gradients" else None)
        out[method] = {"target": e.target_ids, "relevance": [float(r) for r in e.relevance]}
    latent = llm.explain(PROMPT, method="cp-lrp", layers="all").layers
    out["latent"] = {key: value.tolist() for key, value in latent.items()}
    cached = llm.explain(PROMPT, method="attnlrp", kv_cache="h2o", cache_tokens=8)
    out["attnlrp-h2o"] = {"target": cached.target_ids, "relevance": [float(r) for r in cached.relevance]}
    # several targets in one forward (its batched backward runs one target at a time under tensor parallelism)
    generation = llm.explain_generation(PROMPT, max_new_tokens=4)
    out["generation"] = {"target": generation.generated_ids, "relevance": generation.matrix.flatten().tolist()}
    return out


def kept_positions(llm: LLM, policy: str, cache_tokens: int) -> list[list[int]]:
    """Per layer, the positions a cache of ``policy`` keeps after the prompt streamed through it."""
    return [sorted(kept) for kept in streamed(llm, policy, cache_tokens).kept_positions()]


def streamed(llm: LLM, policy: str, cache_tokens: int):
    """A cache of ``policy`` after the prompt streamed through it in chunks of 3 tokens (each
    chunk's scores decide what the next one evicts)."""
    ids = torch.tensor([llm.tokenizer.encode(PROMPT)])
    cache = build_cache(llm.config, 1, policy, cache_tokens)
    with torch.no_grad():
        for chunk in ids.split(3, dim=1):
            llm.model(chunk, cache=cache)
    return cache


def main(checkpoint: str, out: str) -> None:
    torch.set_num_threads(1)
    with closing_group():
        llm = LLM.load(checkpoint, tensor_parallel=True)
        llm.model.eval()
        found = results(llm) | {"n_head": llm.config.n_head, "full_n_head": llm.model.tensor_parallel.full_config.n_head}
    Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(found))


if __name__ == "__main__":
    main(*sys.argv[1:3])

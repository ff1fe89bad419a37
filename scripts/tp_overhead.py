"""Tensor-parallel overhead on the CPU, side by side in one run: one process (1 thread, then 2
threads) against ``torchrun`` with 2 gloo processes of 1 thread each (``--tensor-parallel``).

The model: SmolLM2-135M's shapes (30 layers, width 576, MLP 1536, vocabulary 49152) with 12 heads
of 48 and 4 KV groups instead of its 9 and 3, so that 2 processes divide them; random weights
(``build_model``, seed 0), float32. Measured per setup: greedy decode tokens/s (a 32-token prompt,
64 new tokens, dense cache), the median time of one AttnLRP explanation of a 256-token prompt (one
forward and backward; 3 runs after a warm-up) and the peak RSS of each process (VmHWM)::

    python scripts/tp_overhead.py            # prints the markdown table (2 alternating rounds, the best of each)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lucidlm import Config
from lucidlm.distributed import closing_group, tensor_parallel
from lucidlm.explain.explainer import explain
from lucidlm.generate import generate_ids
from lucidlm.train.pretrain import build_model

CONFIG = dict(vocab_size=49152, n_embd=576, n_layer=30, n_head=12, n_query_groups=4, head_size=48,
              intermediate_size=1536, block_size=2048, tie_embeddings=True, norm_eps=1e-5)
PROMPT, NEW, EXPLAINED = 32, 64, 256


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(parallel: bool) -> dict:
    model = build_model(Config(**CONFIG), seed=0)
    if parallel:
        tensor_parallel(model)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, EXPLAINED), generator=torch.Generator().manual_seed(1)).tolist()[0]
    list(generate_ids(model, [ids[:PROMPT]], 4))  # warm-up (and the CPU kernel's load)
    start = time.perf_counter()
    tokens = [step[0] for step in generate_ids(model, [ids[:PROMPT]], NEW)]
    decode = (time.perf_counter() - start)
    explain(model, None, ids, method="attnlrp")  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        relevance = explain(model, None, ids, method="attnlrp").relevance
        times.append(time.perf_counter() - start)
    return {"tok_s": NEW / decode, "explain_s": statistics.median(times), "rss_mb": peak_rss_mb(),
            "tokens": tokens, "relevance": relevance.tolist()}


def worker(out: str) -> None:
    parallel = "WORLD_SIZE" in os.environ
    with closing_group() if parallel else contextlib.nullcontext():
        found = measure(parallel)
    Path(out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(found))


def run(label: str, command: list[str], threads: int, out: Path) -> list[dict]:
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command + [str(out)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def best(rounds: list[list[dict]]) -> list[dict]:
    """Per process, the fastest decode and explanation over the rounds (the least disturbed by
    other work on a shared machine)."""
    return [dict(runs[0], tok_s=max(r["tok_s"] for r in runs), explain_s=min(r["explain_s"] for r in runs),
                 rss_mb=max(r["rss_mb"] for r in runs)) for runs in zip(*rounds)]


def main(rounds: int = 2) -> None:
    me = [sys.executable, __file__, "--worker"]
    torchrun = [shutil.which("torchrun", path=os.path.dirname(sys.executable)), "--standalone",
                "--nproc-per-node", "2", __file__, "--worker"]
    setups = [("1 process, 1 thread", me, 1), ("1 process, 2 threads", me, 2),
              ("tensor parallel: 2 processes x 1 thread (gloo)", torchrun, 1)]
    found: dict[str, list[list[dict]]] = {label: [] for label, _, _ in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):  # the setups alternate, so that a busy spell hits them alike
            for i, (label, cmd, threads) in enumerate(setups):
                found[label].append(run(label, cmd, threads, Path(tmp, f"{round_}-{i}")))
    results = [(label, best(runs)) for label, runs in found.items()]
    base = results[0][1][0]
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}; best of {rounds} alternating rounds")
    print(f"| setup | decode tok/s | AttnLRP explanation, {EXPLAINED} tokens (s) | peak RSS per process (MB) |")
    print("|---|---:|---:|---:|")
    for label, ranks in results:
        r = ranks[0]
        rss = " / ".join(f"{x['rss_mb']:.0f}" for x in ranks)
        print(f"| {label} | {r['tok_s']:.1f} | {r['explain_s']:.2f} | {rss} |")
    tp = results[-1][1]
    diff = max(abs(a - b) for a, b in zip(tp[0]["relevance"], base["relevance"]))
    print(f"\ngreedy tokens equal: {all(r['tokens'] == base['tokens'] for r in tp)}; "
          f"largest relevance difference to 1 process: {diff:.2e} (largest |relevance| "
          f"{max(abs(x) for x in base['relevance']):.2e})")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()

"""One decode step's matrix-vector products, lucidlm's CPU kernel against PyTorch, side by side.

SmolLM2-135M's shapes (30 layers of q, k, v, o, gate, up, down, then the 49152-row lm_head), random
weights, one row of activations; median milliseconds per pass over all of them, and the memory
bandwidth that implies::

    OMP_NUM_THREADS=2 python scripts/gemv_bench.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.nn import functional as F

from lucidlm.model.linear import kernel_ready

EMBD, FFN, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30


def shapes() -> list[tuple[int, int]]:
    per_layer = [(EMBD, EMBD), (KV, EMBD), (KV, EMBD), (EMBD, EMBD), (FFN, EMBD), (FFN, EMBD), (EMBD, FFN)]
    return per_layer * LAYERS + [(VOCAB, EMBD)]


def median_ms(fn, rounds: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    if not kernel_ready():
        raise SystemExit("lucidlm's kernel is unavailable here (no C++ compiler, or LUCIDLM_KERNELS=0)")
    gemv = torch.ops.lucidlm_kernels.gemv
    print(f"{'weights':<10}{'F.linear ms':>12}{'kernel ms':>11}{'speed-up':>10}{'kernel GB/s':>13}")
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(s).to(dtype) for s in shapes()]
        rows = {k: torch.randn(1, k, dtype=dtype) for k in (EMBD, FFN)}
        with torch.inference_mode():
            torch_ms = median_ms(lambda: [F.linear(rows[w.shape[1]], w) for w in weights])
            ours_ms = median_ms(lambda: [gemv(rows[w.shape[1]], w, None) for w in weights])
        gigabytes = sum(w.numel() * w.element_size() for w in weights) / 1e9
        print(f"{str(dtype).removeprefix('torch.'):<10}{torch_ms:>12.1f}{ours_ms:>11.1f}{torch_ms / ours_ms:>9.2f}x"
              f"{gigabytes / ours_ms * 1e3:>13.1f}")


if __name__ == "__main__":
    main()

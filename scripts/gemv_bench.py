"""One decode step's matrix-vector products, lucidlm's CPU kernels against PyTorch, side by side.

SmolLM2-135M's shapes (30 layers of q, k, v, o, gate, up, down, then the 49152-row lm_head), random
weights, one row of activations; median milliseconds per pass over all of them, and the memory
bandwidth that implies (weights and their scales read once per step). Rows: float32 and bfloat16
weights (``gemv``), int8 with one scale per channel (``Int8Linear``'s storage) with float32 and bfloat16
activations, GGUF's Q8_0 / Q4_0 / Q4_1 blocks (``q8_gemv`` / ``q4_gemv``), each beside PyTorch's way
(``F.linear``, ``torch._weight_int8pack_mm``, or dequantise + ``F.linear``)::

    OMP_NUM_THREADS=2 python scripts/gemv_bench.py            # add --vnni for the int8-activation path
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from lucidlm.model.linear import kernel_ready
from lucidlm.model.qlinear import dequantize_q4, dequantize_q8

EMBD, FFN, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30


def shapes() -> list[tuple[int, int]]:
    per_layer = [(EMBD, EMBD), (KV, EMBD), (KV, EMBD), (EMBD, EMBD), (FFN, EMBD), (FFN, EMBD), (EMBD, FFN)]
    return per_layer * LAYERS + [(VOCAB, EMBD)]


def median_ms(fn, rounds: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def int8_per_channel(shape, scale_dtype):
    w = torch.randn(shape)
    scale = w.abs().amax(1, keepdim=True) / 127
    return (w / scale).round().to(torch.int8), scale.to(scale_dtype)


def q8_0(shape):
    w = torch.randn(shape).unflatten(1, (-1, 32))
    scale = (w.abs().amax(-1) / 127).half()
    return (w / scale.float()[..., None]).round().to(torch.int8).flatten(1), scale


def q4(shape, with_mins):
    n, k = shape
    qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale = (torch.rand(n, k // 32) * 0.01).half()
    return qs, scale, (torch.randn(n, k // 32) * 0.01).half() if with_mins else None


def cases():
    """(name, activation dtype, weights, kernel product, PyTorch's product)."""
    ops = torch.ops.lucidlm_kernels
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        yield name, dtype, [torch.randn(s).to(dtype) for s in shapes()], lambda x, w: ops.gemv(x, w, None), F.linear
    for dtype in (torch.float32, torch.bfloat16):
        acts = str(dtype).removeprefix("torch.")
        yield (f"int8 ({acts} x)", dtype, [int8_per_channel(s, dtype) for s in shapes()],
               lambda x, w: ops.q8_gemv(x, w[0], w[1], None),
               lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1].flatten()))
    dequantised = lambda fn: lambda x, w: F.linear(x, fn(*w).to(x.dtype))  # noqa: E731
    yield "q8_0", torch.float32, [q8_0(s) for s in shapes()], lambda x, w: ops.q8_gemv(x, *w, None), \
        dequantised(dequantize_q8)
    for label, with_mins in (("q4_0", False), ("q4_1", True)):
        yield label, torch.float32, [q4(s, with_mins) for s in shapes()], lambda x, w: ops.q4_gemv(x, *w, None), \
            dequantised(dequantize_q4)


def nbytes(weights) -> int:
    tensors = [t for w in weights for t in (w if isinstance(w, tuple) else (w,)) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    if "--vnni" in sys.argv:
        os.environ["LUCIDLM_VNNI"] = "1"
    if not kernel_ready():
        raise SystemExit("lucidlm's kernel is unavailable here (no C++ compiler, or LUCIDLM_KERNELS=0)")
    print(f"threads {torch.get_num_threads()}, 8-bit path: {torch.ops.lucidlm_kernels.q8_path()}")
    print(f"{'weights':<20}{'MB':>7}{'PyTorch ms':>12}{'kernel ms':>11}{'speed-up':>10}{'kernel GB/s':>13}")
    for name, dtype, weights, ours, theirs in cases():
        first = weights[0][0] if isinstance(weights[0], tuple) else weights[0]
        rows = {k: torch.randn(1, k, dtype=dtype) for k in (EMBD, FFN)}
        k_of = (lambda w: w[0].shape[1] * (2 if w[0].dtype == torch.uint8 else 1)) if first is not weights[0] \
            else (lambda w: w.shape[1])
        with torch.inference_mode():
            torch_ms = median_ms(lambda: [theirs(rows[k_of(w)], w) for w in weights], *((3, 1) if "q" in name else (10, 3)))
            ours_ms = median_ms(lambda: [ours(rows[k_of(w)], w) for w in weights])
        size = nbytes(weights)
        print(f"{name:<20}{size / 1e6:>7.0f}{torch_ms:>12.1f}{ours_ms:>11.1f}{torch_ms / ours_ms:>9.2f}x"
              f"{size / ours_ms / 1e6:>13.1f}")


if __name__ == "__main__":
    main()

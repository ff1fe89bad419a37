"""``lucidlm bench export``: GGUF export of one model to each type: file size, export time, and
whether the exported file, loaded back by lucidlm, continues a prompt with the same greedy text.

The model loads once (float32); each type is exported into a temporary folder by
:meth:`lucidlm.LLM.export_gguf` (the time is the call's wall time: the weights' layout, the
quantisation and the write), then read back with :meth:`lucidlm.LLM.load` and its greedy
continuation of ``--prompt`` compared with the source model's.

>>> format_row("q8_0", {"bytes": 144_811_168, "seconds": 8.84, "same": True, "diverges_at": None})
'q8_0  |     144.8 MB |     8.8 s | yes'
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from . import emit, prepare_model, progress
from .args import add_export as add_arguments  # noqa: F401  (lucidlm bench export's options)


def run(args) -> int:
    import torch

    from ..api import LLM
    from ..checkpoints.gguf.writer import check_type

    types = [check_type(t.strip()) for t in args.types.split(",") if t.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_model(args.model)
    llm = LLM.load(args.model, dtype=torch.float32)
    reference = llm.generate(args.prompt, max_new_tokens=args.new_tokens)
    emit(f"export benchmark: {args.model or 'embedded SmolLM2-135M-Instruct'} (loaded as float32), "
         f"{args.new_tokens} greedy tokens of {args.prompt!r} compared after reloading each export")
    emit(f"{'type':<6}| {'file size':>12} | {'time':>9} | same greedy text")
    with tempfile.TemporaryDirectory(prefix="lucidlm-bench-export-") as tmp, \
            progress(len(types), "bench export") as bar:
        for kind in types:
            bar.set_postfix_str(kind)
            emit(format_row(kind, _measure(llm, Path(tmp) / f"model-{kind}.gguf", kind, args, reference)))
            bar.update(1)
    return 0


def _measure(llm, path: Path, kind: str, args, reference: str) -> dict:
    import torch

    from ..api import LLM

    start = time.perf_counter()
    llm.export_gguf(path, type=kind)
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    text = LLM.load(path, dtype=torch.float32).generate(args.prompt, max_new_tokens=args.new_tokens)
    path.unlink()  # one export on disk at a time
    diverges = next((i for i, (a, b) in enumerate(zip(text, reference)) if a != b), None)
    if diverges is None and len(text) != len(reference):
        diverges = min(len(text), len(reference))
    return {"bytes": size, "seconds": seconds, "same": text == reference, "diverges_at": diverges}


def format_row(kind: str, r: dict) -> str:
    same = "yes" if r["same"] else f"no (from character {r['diverges_at']})"
    return f"{kind:<6}| {r['bytes'] / 1e6:>9.1f} MB | {r['seconds']:>7.1f} s | {same}"

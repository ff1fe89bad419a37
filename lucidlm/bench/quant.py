"""``lucidlm bench quant``: what quantised weights cost in perplexity, beside float32, in one table.

Rows (``--rows``): ``float32`` (the reference: the model's weights in float32; for the embedded
GGUF, its Q4_1 blocks dequantised), ``bfloat16``, weight-only int8 with float32 or bfloat16
activations (``int8-float32``, ``int8-bfloat16``: :meth:`lucidlm.LLM.quantize`), and GGUF files
loaded with ``keep_quantized=True`` (``q8_0``, ``q4_0``, ``q4_1``, ...: the blocks kept as they
are), each beside ``float32@TYPE``, the same file dequantised to float32. The GGUF files: ``--gguf``
(repeatable), the model itself when it is one, and, for ``q8_0``/``q4_0`` rows without a file,
lucidlm's own export of the float32 model into the cache.

Columns: perplexity of the first ``--tokens`` tokens of ``--text``; the ratio to ``float32``
(the issue's target: within 1% for 8-bit, stated for 4-bit); for a kept GGUF row, the ratio to
the same file dequantised (the kernels' exactness: 1.0000 up to float rounding). The embedded
model *is* a Q4_1 file, so its ``q4_1`` row equals its ``float32`` row by construction; a
``q4_0`` export re-quantises those weights and shows a real 4-bit cost.

>>> ratio_cells(10.05, 10.0, 10.05, "q8_0")
('1.0050', '1.0000', 'yes (within 1%)')
>>> ratio_cells(11.0, 10.0, None, "q4_0")
('1.1000', '-', '4-bit: +10.0%')
"""

from __future__ import annotations

import gc
import inspect
from pathlib import Path

from . import emit, prepare_model, progress
from .args import add_quant as add_arguments  # noqa: F401  (lucidlm bench quant's options)
from .decode import FILE_TYPED, model_file

EXPORTABLE = ("q8_0", "q4_0")  # lucidlm's export writes these when no file is given
EIGHT_BIT = ("int8-float32", "int8-bfloat16", "q8_0")


def run(args) -> int:
    import torch

    from .llamacpp import gguf_type

    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_model(args.model)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    files: dict[str, Path] = {}
    for path in [*(Path(f) for f in args.gguf or []), *filter(None, [model_file(args.model)])]:
        files.setdefault(gguf_type(path), path)
    text = args.text.read_text(encoding="utf-8")
    emit(f"quantisation benchmark: {args.model or 'embedded SmolLM2-135M-Instruct'}, perplexity of the first "
         f"{args.tokens} tokens of {args.text}, chunk {args.chunk_size}")
    emit(f"{'row':<16}{'weights':<66}{'perplexity':>11}{'/ float32':>11}{'/ same file fp32':>18}  target")
    ppl: dict[str, float] = {}
    ids: list[int] | None = None
    with progress(len(rows), "bench quant") as bar:
        for row in ["float32", *(r for r in rows if r != "float32")]:
            bar.set_postfix_str(row)
            try:
                source, llm = _load(args, row, files)
                ids = ids or llm.tokenizer.encode(text)[:args.tokens]
                ppl[row] = llm.perplexity(ids, chunk_size=args.chunk_size).perplexity
                del llm
                gc.collect()
            except Exception as e:  # noqa: BLE001  (a missing feature or a failure is this row's cell)
                emit(f"{row:<16}failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                bar.update(1)
                continue
            same = ppl.get(f"float32@{row}", ppl["float32"] if _is_model(args, row, files) else None)
            cells = ratio_cells(ppl[row], ppl["float32"], same if row in files else None, row)
            emit(f"{row:<16}{_short(source):<66}{ppl[row]:>11.4f}{cells[0]:>11}{cells[1]:>18}  {cells[2]}")
            bar.update(1)
    return 0


def ratio_cells(value: float, float32: float, same_file: float | None, row: str) -> tuple[str, str, str]:
    """The ratio to float32, to the same file dequantised (or ``-``), and the target's verdict."""
    ratio = value / float32
    if row in EIGHT_BIT or row == "float32@q8_0":
        verdict = f"{'yes' if abs(ratio - 1) <= 0.01 else 'NO'} (within 1%)"
    elif row.startswith("q4") or row.startswith("float32@q4"):
        verdict = f"4-bit: {100 * (ratio - 1):+.1f}%"
    else:
        verdict = "-"
    return f"{ratio:.4f}", "-" if same_file is None else f"{value / same_file:.4f}", verdict


def _load(args, row: str, files: dict[str, Path]):
    """``(what was loaded, the LLM)`` for one row; a GGUF row without a file gets lucidlm's export."""
    import torch

    from ..api import LLM
    from ..errors import ConfigError
    from .llamacpp import gguf_export

    kind = row.partition("@")[2] or row
    if kind in FILE_TYPED and kind not in files:
        if kind not in EXPORTABLE:
            raise ConfigError(f"no {kind} GGUF file: pass --gguf FILE")
        files[kind] = gguf_export(args.model, kind)
    if row.startswith("float32@"):
        return f"{files[kind]} dequantised", LLM.load(files[kind], dtype=torch.float32)
    if kind in FILE_TYPED:
        if "keep_quantized" not in inspect.signature(LLM.load).parameters:
            raise ConfigError(f"{kind}: this lucidlm has no LLM.load(keep_quantized=True) (GGUF blocks kept as "
                              "they are, issue 29)")
        return f"{files[kind]} kept", LLM.load(files[kind], keep_quantized=True)
    name = args.model or "embedded"
    if row.startswith("int8-"):
        return f"{name} int8, {row[5:]} activations", LLM.load(args.model, dtype=row[5:], quantize="int8")
    return f"{name} {row}", LLM.load(args.model, dtype=row)


def _is_model(args, kind: str, files: dict[str, Path]) -> bool:
    return kind in files and model_file(args.model) == files[kind]


def _short(source: str) -> str:
    """A path shortened to its file name (the table's column stays narrow)."""
    head, _, tail = source.partition(" ")
    return f"{Path(head).name} {tail}".strip() if "/" in head else source

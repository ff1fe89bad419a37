"""``lucidlm export [SRC] OUT.gguf --type f32|f16|bf16|q8_0|q4_0 [--adapter DIR]``: one GGUF file that
llama.cpp runs, with the tokenizer, chat template and ``general.*`` metadata. SRC is an HF
directory, a ``.gguf`` file or a hub repo id (or ``--model``; neither: the embedded model); with
``--adapter`` the LoRA adapter is merged into the weights first. Torch-free at import.

>>> args = EXPORT.parse(["out.gguf", "--type", "q8_0"])
>>> args.src, args.out, args.type, EXPORT.model(args), EXPORT.outputs(args)
(None, PosixPath('out.gguf'), 'q8_0', ('--model', None), [('OUT', PosixPath('out.gguf'))])
>>> EXPORT.model(EXPORT.parse(["my-model", "out.gguf"]))
('SRC', 'my-model')
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..dtypes import GGUF_EXPORT_TYPES
from .options import Command, Paths, UsageError, add_model



def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="?", default=None,
                   help="HF directory, .gguf file, hub repo id org/name or catalogue name (default: --model, else "
                        "the embedded model)")
    p.add_argument("out", type=Path, help="the .gguf file to write (replaced atomically if it exists)")
    p.add_argument("--type", choices=GGUF_EXPORT_TYPES, default="f16", type=str.lower,
                   help="tensor type: f32 and f16/bf16 keep the weights (norms stay f32); q8_0 and q4_0 are "
                        "llama.cpp's 8- and 4-bit blocks")
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter directory to merge in first (default: none)")
    p.add_argument("--no-check-base", action="store_true", help="merge even if the adapter names another base")
    add_model(p)


def run_export(args: argparse.Namespace) -> int:
    from ..api import LLM
    from ..checkpoints.conversion_cache import format_bytes

    llm = LLM.load(_source(args), adapter=args.adapter, dtype=args.dtype, progress=True,
                   check_base=not args.no_check_base)
    if args.adapter is not None:
        llm.merge_adapter()
    start = time.perf_counter()
    out = llm.export_gguf(args.out, type=args.type, progress=True)
    print(f"wrote {out}: {args.type}, {format_bytes(out.stat().st_size)} in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return 0


def _source(args: argparse.Namespace) -> str | None:
    return args.src if args.src is not None else args.model


def _model(args: argparse.Namespace) -> tuple[str, str | None]:
    """The checkpoint argument, for the pre-load checks (which call this before anything loads)."""
    if args.src is not None and args.model is not None:
        raise UsageError("give the model once: SRC or --model, not both")
    return ("SRC", args.src) if args.src is not None else ("--model", args.model)


def _inputs(args: argparse.Namespace) -> Paths:
    return [("--adapter", args.adapter)]


def _outputs(args: argparse.Namespace) -> Paths:
    return [("OUT", args.out)]


EXPORT = Command("export", "write a model as one GGUF file for llama.cpp (f32, f16, bf16, q8_0, q4_0)", add_export,
                 run_export, inputs=_inputs, outputs=_outputs, model=_model)

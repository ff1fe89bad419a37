"""Checkpoints in and out: ``lucidlm convert`` (GGUF or HF directory -> HF directory), ``lucidlm
download`` (a hub repo's safetensors, by repo id or catalogue name) and ``lucidlm merge`` (fold a
LoRA adapter into its base).

>>> args = MERGE.parse(["adapter", "out", "--dtype", "bfloat16"])  # onto the embedded model
>>> MERGE.model(args), MERGE.inputs(args)
(('BASE', None), [('ADAPTER', PosixPath('adapter'))])
>>> MERGE.model(MERGE.parse(["--model", "org/base", "adapter", "out"]))
('--model', 'org/base')
>>> MERGE.model(MERGE.parse(["base", "adapter", "out"]))  # the older form: BASE first
('BASE', 'base')
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CheckpointError
from .options import EMBEDDED, Command, Paths, UsageError, add_dtype, add_model, cli_hints, hub_name


def add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a .gguf file, an HF directory, a hub repo id org/name or a catalogue name")
    p.add_argument("out_dir", type=Path, help="a new (or empty) directory")
    add_dtype(p, "dtype of the saved weights")


def run_convert(args: argparse.Namespace) -> int:
    from ..api import LLM

    _check_new_dir(args.out_dir)
    llm = LLM.load(args.src, dtype=args.dtype, progress=True)
    _write_checkpoint_dir(llm, args.out_dir)
    return 0


def add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", type=hub_name, metavar="REPO",
                   help="org/name on the Hugging Face hub, or a catalogue name (lucidlm models)")
    p.add_argument("--dir", type=Path, default=None, help="copy into this directory (default: the HF cache)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="fetch again files the cache holds (after a corrupt download)")


def run_download(args: argparse.Namespace) -> int:
    from ..checkpoints.hub import download

    print(download(args.repo_id, directory=args.dir, revision=args.revision, progress=True, force=args.force))
    return 0


def add_merge(p: argparse.ArgumentParser) -> None:
    p.usage = "lucidlm merge [-h] [--model BASE] [--dtype DTYPE] [--no-check-base] ADAPTER OUT_DIR"
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="ADAPTER OUT_DIR: a PEFT LoRA adapter directory and a new (or empty) directory; the older "
                        "BASE ADAPTER OUT_DIR form names the base first")
    add_model(p)  # and --dtype: the merged weights' dtype
    p.add_argument("--no-check-base", action="store_true", help="merge even if the adapter names another base")


def merge_paths(args: argparse.Namespace) -> tuple[str | None, Path, Path]:
    """(base, adapter, out) from ``[--model BASE] ADAPTER OUT_DIR`` or ``BASE ADAPTER OUT_DIR``
    (base None: the embedded model); UsageError for any other count, or a base given twice."""
    paths = args.paths
    if len(paths) == 2:
        return args.model, Path(paths[0]), Path(paths[1])
    if len(paths) == 3:
        if args.model is not None:
            raise UsageError(f"the base is given twice (--model {args.model} and {paths[0]}): "
                             "pass ADAPTER OUT_DIR with --model BASE")
        return paths[0], Path(paths[1]), Path(paths[2])
    raise UsageError(f"expected ADAPTER OUT_DIR (with --model BASE, default: the embedded {EMBEDDED}), "
                     f"got {len(paths)} path(s)")


def run_merge(args: argparse.Namespace) -> int:
    from ..api import LLM

    base, adapter, out = merge_paths(args)
    _check_new_dir(out)
    with cli_hints():
        llm = LLM.load(base, adapter=adapter, dtype=args.dtype, progress=True, check_base=not args.no_check_base)
    _write_checkpoint_dir(llm.merge_adapter(), out)
    return 0


def _check_new_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"OUT_DIR {out} exists and is not empty: choose a new directory")


def _write_checkpoint_dir(llm, out: Path) -> None:
    """Save ``llm`` as an HF directory: built in a temporary sibling (with the umask's permissions,
    not mkdtemp's 0700), renamed into place at the end."""
    from ..checkpoints.conversion_cache import format_bytes
    from ..fileio import atomic_dir

    with atomic_dir(out) as tmp:
        llm.save(tmp)
    dtype = str(next(llm.model.parameters()).dtype).removeprefix("torch.")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    hint = " (the default dtype; --dtype bfloat16 halves the size)" if dtype == "float32" else ""
    print(f"wrote {out}: {dtype} weights, {format_bytes(size)}{hint}", file=sys.stderr)


def _convert_source(args: argparse.Namespace) -> tuple[str, str | None]:
    return "SRC", args.src


def _merge_inputs(args: argparse.Namespace) -> Paths:
    return [("ADAPTER", merge_paths(args)[1])]


def _merge_base(args: argparse.Namespace) -> tuple[str, str | None]:
    return ("--model" if args.model is not None else "BASE"), merge_paths(args)[0]


CONVERT = Command("convert", "GGUF or HF directory -> HF safetensors directory", add_convert, run_convert,
                  model=_convert_source)
DOWNLOAD = Command("download", "fetch a Hugging Face repo's safetensors checkpoint (never pickles)", add_download,
                   run_download)
MERGE = Command("merge", "fold a LoRA adapter into its base (--model, default: the embedded model) -> HF directory",
                add_merge, run_merge, inputs=_merge_inputs, model=_merge_base)

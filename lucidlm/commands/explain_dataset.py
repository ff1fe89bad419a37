"""``lucidlm explain-dataset``: explain every record of a JSONL file or a local Hugging Face dataset
into shard files (:func:`lucidlm.explain.dataset.explain_dataset`; resumable, and ``torchrun``
spreads the shards over processes). With ``--diff-against BASE`` each record is a diff of the
model (``--model``, with ``--adapter``: the tuned model) against ``BASE``, for ``lucidlm diff-report``.

>>> args = EXPLAIN_DATASET.parse(["data.jsonl", "--out", "run"])
>>> args.method, args.format, args.shard_size, args.diff_against, args.layers
(None, 'jsonl', 1000, None, None)
>>> layer_spec("none"), layer_spec("all"), layer_spec("0,-1")
([], 'all', [0, -1])
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import DataError
from ..explain.dataset import DEFAULT_DIFF_METHOD, DEFAULT_METHOD, FORMATS, Item, check_diff_options, \
    explain_dataset, load_hf_dataset, read_items
from ..methods import METHODS
from .options import Command, Paths, add_cache, add_checkpointing, add_model, add_tensor_parallel, model_path, positive


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", type=Path, default=None, metavar="DATA",
                   help="JSONL: one record a line, {prompt | messages, target?, id?} (or --hf-dataset)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory: shard files, run.json, manifest.json (rerun to resume)")
    p.add_argument("--method", default=None, choices=METHODS,
                   help=f"explanation method (default: {DEFAULT_METHOD}; {DEFAULT_DIFF_METHOD} with --diff-against)")
    p.add_argument("--target-field", default="target", metavar="F",
                   help="the record field holding the target: token text, token id or a continuation "
                        "(default: target; absent: the model's top next token)")
    p.add_argument("--batch-size", type=positive, default=8, metavar="B",
                   help="prompts explained in one forward/backward")
    p.add_argument("--format", default="jsonl", choices=FORMATS, help="shard file format (parquet needs pyarrow)")
    p.add_argument("--shard-size", type=positive, default=1000, metavar="N", help="records per shard file")
    p.add_argument("--limit", type=positive, default=None, metavar="N",
                   help="explain only the first N records (default: all)")
    p.add_argument("--hf-dataset", default=None, metavar="NAME",
                   help="read a Hugging Face dataset instead of DATA: a save_to_disk directory, a local "
                        "dataset directory or a name in the local cache (never downloaded) (default: none)")
    p.add_argument("--split", default="train", metavar="S", help="the --hf-dataset split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model(p)
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                   help="a PEFT LoRA adapter directory to attach to --model (default: none)")
    p.add_argument("--diff-against", type=model_path, default=None, metavar="BASE",
                   help="explain each record as a diff of the model against this base (HF directory, .gguf file "
                        "or hub repo id; one record at a time, JSONL only; read with lucidlm diff-report) "
                        "(default: none)")
    p.add_argument("--layers", type=layer_spec, default=None, metavar="SPEC",
                   help="whose latent relevances (per head and neuron) each row holds: all, none or layer indices "
                        "such as 0,5,-1 (default: none for explanations, all for diffs: about 2 MB a record for "
                        "SmolLM2-135M)")
    add_cache(p)
    add_tensor_parallel(p)
    add_checkpointing(p)


def layer_spec(text: str) -> str | list[int]:
    """``all``, ``none`` (no layer: ``[]``) or comma-separated layer indices (negative from the end)."""
    if text in ("all", "none"):
        return "all" if text == "all" else []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, none or layer indices such as 0,5,-1, got {text!r}") from None


def inputs(args: argparse.Namespace) -> Paths:
    return [("--adapter", args.adapter)]


def run(args: argparse.Namespace) -> int:
    """Check every record, load the model(s), explain, summarise."""
    items = _items(args)  # before torch and the model load: a bad record costs nothing
    if args.diff_against is not None:
        check_diff_options(args.format, args.kv_cache)
    from ..api import LLM
    from ..distributed import closing_group
    from ..model.checkpointing import checkpointing

    parallel = args.tensor_parallel  # the processes hold one model together, not one each
    llm = LLM.load(args.model, adapter=args.adapter, dtype=args.dtype, progress=True, tensor_parallel=parallel)
    base = None if args.diff_against is None else LLM.load(args.diff_against, dtype=args.dtype, progress=True,
                                                            tensor_parallel=parallel)
    method = args.method or (DEFAULT_METHOD if base is None else DEFAULT_DIFF_METHOD)
    with closing_group(), checkpointing(args.checkpointing):
        result = explain_dataset(llm, items, args.out, method=method, batch_size=args.batch_size,
                                 target_field=args.target_field, kv_cache=args.kv_cache,
                                 cache_tokens=args.cache_tokens, format=args.format, shard_size=args.shard_size,
                                 progress=not args.no_progress, diff_against=base,
                                 layers="auto" if args.layers is None else args.layers)
    if result.is_main:
        print(result.summary(method, args.format), file=sys.stderr)
    return 0


def _items(args: argparse.Namespace) -> list[Item]:
    if (args.data is None) == (args.hf_dataset is None):
        raise DataError("explain-dataset: give DATA (a JSONL file) or --hf-dataset NAME, not both and not neither")
    if args.hf_dataset is None:
        return read_items(args.data, args.target_field, args.limit)
    dataset = load_hf_dataset(args.hf_dataset, args.split)
    return read_items(dataset, args.target_field, args.limit, where=f"--hf-dataset {args.hf_dataset}")


EXPLAIN_DATASET = Command("explain-dataset", "explain every record of a JSONL or Hugging Face dataset into shard "
                          "files (resumable; torchrun spreads the shards over processes)", add_arguments, run,
                          inputs=inputs)

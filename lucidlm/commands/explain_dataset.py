"""``lucidlm explain-dataset``: explain every record of a JSONL file or a local Hugging Face dataset
into shard files (:func:`lucidlm.explain.dataset.explain_dataset`; resumable, and ``torchrun``
spreads the shards over processes).

>>> args = EXPLAIN_DATASET.parse(["data.jsonl", "--out", "run"])
>>> args.method, args.format, args.shard_size
('attnlrp', 'jsonl', 1000)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import DataError
from ..explain.dataset import FORMATS, Item, explain_dataset, load_hf_dataset, read_items
from ..methods import METHODS
from .options import Command, add_cache, add_model, positive


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", type=Path, default=None, metavar="DATA",
                   help="JSONL: one record a line, {prompt | messages, target?, id?} (or --hf-dataset)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory: shard files, run.json, manifest.json (rerun to resume)")
    p.add_argument("--method", default="attnlrp", choices=METHODS, help="explanation method")
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
    add_cache(p)


def run(args: argparse.Namespace) -> int:
    """Check every record, load the model, explain, summarise."""
    items = _items(args)  # before torch and the model load: a bad record costs nothing
    from ..api import LLM
    from ..distributed import closing_group

    llm = LLM.load(args.model, dtype=args.dtype, progress=True)
    with closing_group():
        result = explain_dataset(llm, items, args.out, method=args.method, batch_size=args.batch_size,
                                 target_field=args.target_field, kv_cache=args.kv_cache,
                                 cache_tokens=args.cache_tokens, format=args.format, shard_size=args.shard_size,
                                 progress=not args.no_progress)
    if result.is_main:
        print(result.summary(args.method, args.format), file=sys.stderr)
    return 0


def _items(args: argparse.Namespace) -> list[Item]:
    if (args.data is None) == (args.hf_dataset is None):
        raise DataError("explain-dataset: give DATA (a JSONL file) or --hf-dataset NAME, not both and not neither")
    if args.hf_dataset is None:
        return read_items(args.data, args.target_field, args.limit)
    dataset = load_hf_dataset(args.hf_dataset, args.split)
    return read_items(dataset, args.target_field, args.limit, where=f"--hf-dataset {args.hf_dataset}")


EXPLAIN_DATASET = Command("explain-dataset", "explain every record of a JSONL or Hugging Face dataset into shard "
                          "files (resumable; torchrun spreads the shards over processes)", add_arguments, run)

"""``lucidlm cache list`` and ``lucidlm cache clear [--all | NAME...]``: the cache of converted GGUF
files (:mod:`lucidlm.checkpoints.conversion_cache`).

>>> CACHE.parse(["clear", "--all"])
Namespace(cache_action='clear', names=[], all=True)
"""

from __future__ import annotations

import argparse
import sys

from ..checkpoints.conversion_cache import ENV_VAR
from .options import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="cache_action", metavar="{list,clear}", required=True)
    actions.add_parser("list", help="each converted GGUF: source file, size, last use")
    c = actions.add_parser("clear", help="remove entries (they are converted again when next loaded)")
    c.add_argument("names", nargs="*", metavar="NAME",
                   help="an entry (as lucidlm cache list shows it) or its source GGUF file name")
    c.add_argument("--all", action="store_true", help="remove every entry")


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.conversion_cache import cache_root, clear, format_bytes, format_entries, list_entries, select

    entries = list_entries()
    if args.cache_action == "list":
        print(format_entries(entries))
        return 0
    if args.all == bool(args.names):
        print("lucidlm cache clear: give --all or entry names (see: lucidlm cache list)", file=sys.stderr)
        return 2
    if args.all:
        chosen = None
    else:
        chosen, missing = select(entries, args.names)
        if missing:
            print(f"lucidlm cache clear: no cache entry named {', '.join(map(repr, missing))} "
                  f"in {cache_root()} (see: lucidlm cache list)", file=sys.stderr)
            return 1
    count = len(entries) if chosen is None else len(chosen)
    freed = clear(chosen)
    print(f"removed {count} entr{'y' if count == 1 else 'ies'}, freed {format_bytes(freed)}")
    return 0


CACHE = Command("cache", "list or clear converted GGUF checkpoints", add_arguments, run,
                description=f"GGUF files are converted once into a cache: ${ENV_VAR}, else ~/.cache/lucidlm.")

"""``lucidlm bench NAME``: side-by-side benchmarks. The options come from the torch-free
:mod:`lucidlm.bench.args` (:data:`~lucidlm.bench.args.BENCHES`); a bench's module is imported only
when it runs.

>>> BENCH.parse(["kv"]).bench
'kv'
"""

from __future__ import annotations

import argparse
import importlib

from ..bench.args import BENCHES
from .options import Command, Parser


def add_arguments(p: argparse.ArgumentParser) -> None:
    benches = p.add_subparsers(dest="bench", required=True, parser_class=Parser, metavar="BENCH")
    for name, (_, text, add_bench_arguments) in BENCHES.items():
        add_bench_arguments(benches.add_parser(name, help=text, description=text[0].upper() + text[1:] + "."))


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHES[args.bench][0]).run(args)


BENCH = Command("bench", "side-by-side benchmarks: one line each below", add_arguments, run)

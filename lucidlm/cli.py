"""The ``lucidlm`` command line: generate, chat, explain, explain-dataset, diff, diff-report, convert,
models, download, finetune, pretrain, merge, export, serve, view, evaluate, bench, cache,
calibrate-heads. This module is the parser and ``main`` only; each command lives in
:mod:`lucidlm.commands`.

Instant start-up: this module imports neither torch nor a model, so ``--help``, ``lucidlm models``
and every argument mistake answer at once. Every argument is checked before anything loads: bad
arguments exit with status 2 and one line on stderr; so does any lucidlm error (bad model path,
broken checkpoint, unknown cache policy ...).

>>> build_parser().parse_args(["generate", "hi", "--dtype", "bfloat16"]).dtype
'bfloat16'
>>> import contextlib
>>> with contextlib.redirect_stderr(sys.stdout):  # the one line goes to stderr
...     main(["generate", ""])
lucidlm generate: error: the prompt is empty
2
"""

from __future__ import annotations

import argparse
import sys

from .commands import bench, cache, calibrate_heads, convert, diff, diff_report, evaluate, explain, explain_dataset, \
    export, faithfulness, generate, models, serve, train
from .commands.checks import check
from .commands.options import Command, Parser, UsageError
from .errors import LucidError

DESCRIPTION = "lucidlm: run, chat with, explain, fine-tune and serve transformer language models."
EPILOG = """\
Each command has its own options: lucidlm COMMAND --help. Without --model, commands use the
embedded SmolLM2-135M-Instruct; lucidlm models lists the catalogue and what loads offline now.
Bad arguments and lucidlm errors exit with status 2 and one line on stderr."""

#: every command, in the order ``lucidlm --help`` lists them
COMMANDS: dict[str, Command] = {c.name: c for c in (
    generate.GENERATE, generate.CHAT, explain.EXPLAIN, diff.DIFF, explain_dataset.EXPLAIN_DATASET,
    diff_report.DIFF_REPORT, convert.CONVERT, models.MODELS, convert.DOWNLOAD, train.FINETUNE, train.PRETRAIN,
    convert.MERGE, export.EXPORT, serve.SERVE, serve.VIEW, evaluate.EVALUATE, faithfulness.FAITHFULNESS, bench.BENCH,
    cache.CACHE, calibrate_heads.CALIBRATE_HEADS)}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lucidlm", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_to(sub)
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """Notes to print (on stderr); raises :class:`~lucidlm.commands.options.UsageError` for an
    argument that cannot work (see :func:`lucidlm.commands.checks.check`)."""
    return check(args, COMMANDS[args.command])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "lucidlm " + args.command + (f" {args.bench}" if args.command == "bench" else "")
    try:
        for note in check_args(args):
            print(f"lucidlm: note: {note}", file=sys.stderr)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args) or 0
    except LucidError as exc:
        print(f"lucidlm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output that cannot be written (read-only, full disk, gone): one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lucidlm: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # lucidlm ... | head: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

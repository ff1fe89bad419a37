"""``lucidlm explain --generate N`` and ``lucidlm explain --positions LIST``: several targets in one
go, from one forward and one backward batched over them (:mod:`lucidlm.explain.multi`).

* ``--generate N``: greedily generate N tokens and explain each one over every token before it
  (:meth:`lucidlm.LLM.explain_generation`); ``--html``/``--png``/``--json`` write the generation.
* ``--positions all|I,J,...``: explain, at each of those token positions of the prompt, the token
  that follows it there (:meth:`lucidlm.LLM.explain_positions`); ``--json`` writes the list of
  explanations.
* ``--batch-size K``: targets per backward (default: the library's,
  :data:`lucidlm.explain.multi.DEFAULT_BATCH_SIZE`; 1: one backward per target, the least memory).

>>> from lucidlm.commands.explain import EXPLAIN
>>> args = EXPLAIN.parse(["Hi there", "--positions", "0,-1", "--batch-size", "4"])
>>> args.positions, args.batch_size, args.generate
([0, -1], 4, None)
>>> check_many(EXPLAIN.parse(["Hi", "--generate", "3", "--target", " x"]))
Traceback (most recent call last):
...
lucidlm.commands.options.UsageError: --generate explains the tokens it generates: drop --target
"""

from __future__ import annotations

import argparse
import json
import sys

from ..fileio import atomic_write
from ..methods import METHODS
from .options import UsageError, hints_as_notes, positive

ALL = "all"


def position_list(text: str) -> list[int] | str:
    """``all`` or comma-separated token indices (negative count from the end)."""
    if text.strip() == ALL:
        return ALL
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated token indices, got {text!r}") from None


def add_many(p: argparse.ArgumentParser) -> None:
    """``--generate N`` | ``--positions LIST``, and ``--batch-size K``."""
    many = p.add_mutually_exclusive_group()
    many.add_argument("--generate", type=positive, default=None, metavar="N",
                      help="greedily generate N tokens and explain each one over every token before it, all in "
                           "one forward and one batched backward (default: none, the prompt's next token only)")
    many.add_argument("--positions", type=position_list, default=None, metavar="LIST",
                      help="'all' or comma-separated token indices of the prompt (negative: from the end; write "
                           "--positions=-2,-1 when the list starts with a minus): explain "
                           "the token that follows each position, all in one forward and one batched backward "
                           "(default: none, the prompt's next token only)")
    p.add_argument("--batch-size", type=positive, default=None, metavar="K",
                   help="with --generate/--positions: targets per backward (default: 8; 1: one backward per "
                        "target, the least memory)")


def check_many(args: argparse.Namespace) -> None:
    """A :class:`UsageError` for options that do not go with ``--generate``/``--positions``
    (checked before anything loads)."""
    flag = "--generate" if args.generate is not None else "--positions" if args.positions is not None else None
    if flag is None:
        if args.batch_size is not None:
            raise UsageError("--batch-size applies to --generate or --positions")
        return
    what = "the tokens it generates" if flag == "--generate" else "the token that follows each position"
    for option, value in (("--target", args.target), ("--target-id", args.target_id), ("--kv-cache", args.kv_cache),
                          ("--cache-tokens", args.cache_tokens)):
        if value is not None:
            raise UsageError(f"{flag} explains {what}: drop {option}")
    if args.method not in METHODS:
        raise UsageError(f"{flag} takes a rule method ({', '.join(METHODS)}), not --method {args.method}")
    if flag == "--positions" and (args.html is not None or args.png is not None):
        raise UsageError("--positions writes --json (a list of explanations); --html and --png draw one")


def run_many(llm, prompt, args: argparse.Namespace) -> int:
    """Explain, print, and write the files asked for."""
    skip_first = not args.keep_first
    chunks = {} if args.batch_size is None else {"batch_size": args.batch_size}  # else the library's default
    with hints_as_notes():
        if args.generate is not None:
            result = llm.explain_generation(prompt, max_new_tokens=args.generate, method=args.method,
                                            **chunks)
            print(result.to_terminal(skip_first=skip_first))
        else:
            positions = None if args.positions == ALL else args.positions
            result = llm.explain_positions(prompt, positions=positions, method=args.method, **chunks)
            for explanation in result:
                print(explanation.to_terminal(skip_first=skip_first))
    written = [(args.json, lambda path: _save_json(result, path))]
    if args.generate is not None:
        written += [(args.html, result.save_html),
                    (args.png, lambda path: result.save_png(path, skip_first=skip_first))]
    for path, save in written:
        if path is not None:
            save(path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _save_json(result, path) -> None:
    if isinstance(result, list):  # --positions: one explanation per position, each as explain --json writes it
        atomic_write(path, json.dumps([e.to_dict() for e in result], ensure_ascii=False, allow_nan=False, indent=1))
    else:
        result.save_json(path)

"""``lucidlm explain PROMPT``: which prompt tokens made the model predict its next token, as a
terminal heatmap and, on request, HTML, PNG and JSON files.

>>> args = EXPLAIN.parse(["The capital of France is", "--target-id", "7042"])
>>> args.target_id, args.target, args.method
(7042, None, 'attnlrp')
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..methods import EXPLAIN_METHODS
from .explain_many import add_many, check_many, run_many
from .options import (Command, Paths, add_adapter, add_cache, add_checkpointing, add_device_map, add_model,
                      add_target, add_tensor_parallel, cache_kwargs, every_process, hints_as_notes, load)

EXPLAIN_MANY = ("--generate N explains every generated token and --positions LIST the token that follows each "
                "listed position, all from one forward and one backward batched over the targets (--batch-size: "
                "targets per backward).")
EXPLAIN_KV = ("With --kv-cache the prediction made through that policy is explained: the prompt but its last "
              "token is prefilled (the policy evicting between chunks), the last token decoded over what is "
              "left, and a replay of exactly what each query saw is explained back to the input tokens. With "
              "nothing evicted that is the dense explanation; tokens no layer still held for the last "
              "prediction are greyed out, and may still be relevant through the tokens that saw them.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text whose next token is explained")
    add_model(p)
    add_adapter(p, "explain --model with this adapter attached (lucidlm diff compares it with the base)")
    add_device_map(p)
    add_target(p)
    p.add_argument("--method", default="attnlrp", choices=EXPLAIN_METHODS, help="explanation method")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template first")
    p.add_argument("--keep-first", action="store_true", help="include the first token in the colour scale")
    p.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained HTML heatmap (default: none)")
    p.add_argument("--png", type=Path, metavar="FILE", help="write a PNG heatmap (default: none)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the relevances as JSON (default: none)")
    add_cache(p)
    add_tensor_parallel(p)
    add_checkpointing(p)
    add_many(p)


def outputs(args: argparse.Namespace) -> Paths:
    check_many(args)  # here: outputs are checked before anything loads
    return [("--html", args.html), ("--png", args.png), ("--json", args.json)]


def run(args: argparse.Namespace) -> int:
    llm = load(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    if args.generate is not None or args.positions is not None:
        return run_many(llm, prompt, args)
    target = args.target_id if args.target_id is not None else args.target
    with every_process(llm) as main:  # --tensor-parallel: every process explains, the first one writes
        explanation = _explain(llm, prompt, target, args, main)
    if not main:
        return 0
    skip_first = not args.keep_first
    for path, save in ((args.html, explanation.save_html), (args.json, explanation.save_json)):
        if path is not None:
            save(path)
            print(f"wrote {path}", file=sys.stderr)
    if args.png is not None:
        explanation.save_png(args.png, skip_first=skip_first)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def _explain(llm, prompt, target, args: argparse.Namespace, main: bool = True):
    """Explain and print the terminal heatmap (``main``: this process prints); a hint about the
    target becomes a note on stderr after it (:func:`hints_as_notes`)."""
    with hints_as_notes():
        explanation = llm.explain(prompt, target=target, method=args.method, **cache_kwargs(args),
                                  checkpointing=args.checkpointing)
        if main:
            print(explanation.to_terminal(skip_first=not args.keep_first))  # colour only on a terminal, NO_COLOR honoured
    return explanation


EXPLAIN = Command("explain", "which prompt tokens made the model predict its next token", add_arguments, run,
                  epilog=EXPLAIN_KV + "\n\n" + EXPLAIN_MANY, outputs=outputs)

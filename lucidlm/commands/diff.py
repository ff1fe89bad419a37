"""``lucidlm diff PROMPT``: what fine-tuning changed, as the relevance differences between a base
model and its tuned version (:meth:`lucidlm.LLM.explain_diff`): a summary line, the terminal
rendering of the base, tuned and difference rows and, on request, HTML, PNG and JSON files.

The tuned model is a checkpoint (``--tuned MODEL``: a full fine-tune, a merged adapter) or the base
with a LoRA adapter attached (``--adapter DIR``), exactly one of the two.

>>> args = DIFF.parse(["The capital of France is", "--adapter", "run/adapter", "--target", " Paris"])
>>> args.method, args.base, str(args.adapter), args.target, args.tuned
('cp-lrp', None, 'run/adapter', ' Paris', None)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..methods import METHODS
from .options import (EMBEDDED, Command, Paths, add_dtype, add_target, cli_hints, hints_as_notes, model_path, positive,
                      token_id)

DIFF_EPILOG = ("The summary line gives the explained score under both models and its change, the adapter's share "
               "of the tuned relevance (sum|adapter| / (sum|adapter| + sum|base weights|) over the prompt tokens; "
               "only with --adapter) and the tokens whose relevance changed most. The components whose latent "
               "relevance changed most are in the JSON (both models' layers), for lucidlm diff-report and "
               "ExplanationDiff.components().")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text whose next token is explained by both models")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help=f"the base model: HF directory, .gguf file, hub repo id org/name or catalogue name "
                        f"(default: the embedded {EMBEDDED})")
    tuned = p.add_mutually_exclusive_group(required=True)
    tuned.add_argument("--tuned", type=model_path, metavar="MODEL",
                       help="the tuned checkpoint (a full fine-tune, a merged adapter) of the base's architecture")
    tuned.add_argument("--adapter", type=Path, metavar="DIR",
                       help="a PEFT LoRA adapter directory: the tuned model is the base with it attached")
    p.add_argument("--no-check-base", action="store_true",
                   help="with --adapter: attach it even if it names another base model")
    add_dtype(p, "both models' dtype in memory")
    add_target(p, "the tuned model's")
    contrast = p.add_mutually_exclusive_group()
    contrast.add_argument("--contrast", default=None, metavar="TEXT",
                          help="explain the target's logit minus this token's (a contrast pair; needs --target "
                               "or --target-id) (default: none)")
    contrast.add_argument("--contrast-id", type=token_id, default=None, metavar="ID",
                          help="the contrast token by id (default: none)")
    p.add_argument("--method", default="cp-lrp", choices=METHODS, help="explanation method")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template first")
    p.add_argument("--top", type=positive, default=5, metavar="N",
                   help="tokens the summary names (largest change first)")
    p.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained HTML page (default: none)")
    p.add_argument("--png", type=Path, metavar="FILE", help="write a PNG of the three rows (default: none)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the diff as JSON (default: none)")


def inputs(args: argparse.Namespace) -> Paths:
    return [("--adapter", args.adapter)]


def outputs(args: argparse.Namespace) -> Paths:
    return [("--html", args.html), ("--png", args.png), ("--json", args.json)]


def base_option(args: argparse.Namespace) -> tuple[str, str | None]:
    return "--base", args.base


def run(args: argparse.Namespace) -> int:
    target = _target(args)  # before anything loads
    tuned, base = _models(args)
    prompt = args.prompt
    if args.chat:
        prompt = tuned.tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    diff = _explain(tuned, base, prompt, target, args.method)
    print(summary(diff, args.top))
    if args.html is None and args.png is None and args.json is None:
        print(diff.to_terminal())
    writers = ((args.html, diff.save_html), (args.png, diff.save_png), (args.json, diff.save_json))
    for path, save in writers:
        if path is not None:
            save(path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _target(args: argparse.Namespace):
    from ..errors import ExplainError

    target = args.target_id if args.target_id is not None else args.target
    contrast = args.contrast_id if args.contrast_id is not None else args.contrast
    if contrast == "":
        raise ExplainError("argument --contrast: the contrast is empty")
    if contrast is None:
        return target
    if target is None:
        raise ExplainError("argument --contrast: a contrast needs --target or --target-id (the token it is "
                           "contrasted with)")
    return (target, contrast)


def _models(args: argparse.Namespace):
    """(tuned, base): the tuned model first, so that a bad adapter fails before the second load."""
    from ..api import LLM

    source = args.tuned if args.adapter is None else args.base
    with cli_hints():  # a refused base names --no-check-base
        tuned = LLM.load(source, adapter=args.adapter, dtype=args.dtype, progress=True,
                         check_base=not args.no_check_base)
    return tuned, LLM.load(args.base, dtype=args.dtype, progress=True)


def _explain(tuned, base, prompt, target, method: str):
    """The diff; a hint about the target becomes a note on stderr (:func:`hints_as_notes`)."""
    with hints_as_notes():
        return tuned.explain_diff(base, prompt, target=target, method=method)


def summary(diff, top: int = 5) -> str:
    """Two lines: the target, both scores, their change and the adapter's share; the ``top`` tokens
    whose relevance changed most (by magnitude, sign kept)."""
    from ..explain.diff_report import adapter_share

    tuned = diff.tuned
    share = adapter_share(diff)
    line = (f"target {tuned.target!r} ({tuned.method}, {tuned.score_label}): base {diff.base.target_logit:.4g}, "
            f"tuned {tuned.target_logit:.4g}, change {diff.logit_delta:+.4g}"
            + ("" if share is None else f"; adapter share {share:.1%}"))
    change = diff.relevance.tolist()
    order = sorted(range(len(change)), key=lambda i: -abs(change[i]))[:top]
    tokens = ", ".join(f"{diff.tokens[i]!r} {change[i]:+.3g}" for i in order)
    return f"{line}\ntokens changed most: {tokens}"


DIFF = Command("diff", "what fine-tuning changed: relevance of the prompt tokens under a base and a tuned model, "
               "and their difference", add_arguments, run, epilog=DIFF_EPILOG, inputs=inputs, outputs=outputs,
               model=base_option)

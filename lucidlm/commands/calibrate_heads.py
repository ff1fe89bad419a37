"""``lucidlm calibrate-heads MODEL --out FILE``: score every KV head of MODEL as a retrieval or a
streaming head (:mod:`lucidlm.calibrate`) on synthetic passkey prompts built from local text,
and write the scores (JSON, atomically) for the ``duo`` KV-cache policy:
``--kv-cache "duo(heads_file=FILE)"``.

>>> args = CALIBRATE_HEADS.parse(["m", "--out", "heads.json", "--samples", "4"])
>>> args.model, args.samples, args.length
('m', 4, 1024)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import Command, Paths, add_dtype, load, non_negative_int, positive


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="HF directory, .gguf file or hub repo id (default: the embedded model)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="where the head scores are written (JSON)")
    p.add_argument("--texts", type=Path, nargs="+", default=[], metavar="PATH",
                   help="text files or directories for the haystack (default: /usr/share/common-licenses)")
    p.add_argument("--samples", type=positive, default=8, metavar="N", help="passkey prompts, needle depths 0-100%%")
    p.add_argument("--length", type=positive, default=1024, metavar="TOKENS", help="tokens per prompt")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the pass keys and haystack offsets")
    add_dtype(p, "the weights' dtype in memory")


def _inputs(args: argparse.Namespace) -> Paths:
    return [("--texts", path) for path in args.texts]


def _outputs(args: argparse.Namespace) -> Paths:
    return [("--out", args.out)]


def run(args: argparse.Namespace) -> int:
    from ..cache.heads import write_head_scores
    from ..calibrate import calibrate_heads

    llm = load(args)
    heads = calibrate_heads(llm, llm.tokenizer, args.texts, args.samples, args.length, args.seed)
    path = write_head_scores(args.out, heads)
    best = sorted(((s, layer, g) for layer, row in enumerate(heads.scores) for g, s in enumerate(row)), reverse=True)
    print(f"wrote {path}: {len(heads.scores)} layers x {len(heads.scores[0])} KV heads; strongest retrieval heads "
          + ", ".join(f"L{layer}.{g} ({s:.3f})" for s, layer, g in best[:5]))
    return 0


CALIBRATE_HEADS = Command("calibrate-heads", "find retrieval and streaming KV heads for the duo cache policy",
                          add_arguments, run, inputs=_inputs, outputs=_outputs,
                          model=lambda args: ("MODEL", args.model))

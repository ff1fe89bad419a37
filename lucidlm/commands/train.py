"""``lucidlm finetune`` (LoRA, QLoRA, LLaMA-Adapter (V2) or full fine-tuning on chat / instruction / text JSONL) and
``lucidlm pretrain`` (next-token training of all weights on raw text). Under ``torchrun`` every
process runs the command; the process group is left before it returns.

>>> args = FINETUNE.parse(["data.jsonl", "--out", "run", "--steps", "3"])
>>> args.method, args.steps, args.lr, args.precision
('lora', 3, None, 'auto')
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CheckpointError
from ..train.names import PRECISIONS, PROMPT_STYLES, STRATEGIES, TRAIN_METHODS
from .options import (Command, Paths, add_adapter, add_cache, add_checkpointing, add_dtype, add_model, cache_kwargs,
                      fraction, load,
                      non_negative_float, non_negative_int, positive, positive_float)


def add_training(p: argparse.ArgumentParser, lr: float | None) -> None:
    """The options finetune and pretrain share; ``lr``: the default learning rate (None: by method)."""
    p.add_argument("--out", type=Path, required=True, help="run directory: log.jsonl, loss.png, checkpoint/, result")
    p.add_argument("--steps", type=positive, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=positive, default=8, help="global batch (split across torchrun processes)")
    p.add_argument("--micro-batch-size", type=positive, default=None,
                   help="examples per forward per process; smaller than the share: gradient accumulation "
                        "(default: the whole share)")
    p.add_argument("--lr", type=positive_float, default=lr,
                   help="peak learning rate" if lr is not None else
                   "peak learning rate (default: 2e-4 LoRA, 1e-3 adapters, 2e-5 full)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="linear warmup (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="gradient norm clip")
    p.add_argument("--max-seq-length", type=positive, default=None,
                   help="longer examples are truncated with a warning (default: the context, at most 2048)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16-mixed where the hardware computes bf16 natively")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, dropout and new weights")
    p.add_argument("--val-split", type=fraction, default=None,
                   help="fraction held out for validation (default: 0.1)")
    p.add_argument("--eval-every", type=positive, default=None, help="validate every N steps "
                                                                      "(default: 10 times per run)")
    p.add_argument("--save-every", type=non_negative_int, default=None, metavar="N",
                   help="checkpoint every N steps, 0: only at the end (default: every tenth of the run; always at "
                        "the end and on Ctrl-C)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="under torchrun: auto = DDP for LoRA, FSDP2 for full")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --out that holds an earlier run (deletes its log, checkpoint and "
                            "adapter)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_checkpointing(p)


def add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="JSONL: {messages}, {instruction, input, output} or {text} per line")
    p.add_argument("--method", default="lora", choices=TRAIN_METHODS,
                   help="qlora: LoRA over int8 base weights; adapter/adapter_v2: LitGPT's LLaMA-Adapter (V2)")
    add_model(p)
    add_adapter(p, "continue training this LoRA or LitGPT adapter, not a new one")
    p.add_argument("--lora-r", type=positive, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=positive_float, default=16, help="LoRA scale numerator (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=fraction, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: all linear layers)")
    p.add_argument("--adapter-prompt-length", type=positive, default=10, metavar="N",
                   help="--method adapter/adapter_v2: learned prefix tokens per layer")
    p.add_argument("--adapter-start-layer", type=non_negative_int, default=2, metavar="N",
                   help="--method adapter/adapter_v2: the first layer with a prefix")
    p.add_argument("--prompt-style", default="auto", choices=PROMPT_STYLES,
                   help="instruction records: the chat template (auto, when there is one) or the Alpaca prompt")
    add_cache(p)  # train through a bounded KV cache, in chunks (lucidlm/train/chunked.py)
    p.add_argument("--chunk-size", type=positive, default=None, metavar="N",
                   help="with --kv-cache: tokens per chunk of the cached training forward (default: 256)")
    add_training(p, None)


def run_finetune(args: argparse.Namespace) -> int:
    llm = load(args)  # with --adapter attached
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
    return _train(lambda: llm.finetune(args.data, method=args.method, out=args.out, lora_r=args.lora_r,
                                       lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                       lora_targets=targets, adapter_prompt_length=args.adapter_prompt_length,
                                       adapter_start_layer=args.adapter_start_layer, prompt_style=args.prompt_style,
                                       **cache_kwargs(args), chunk_size=args.chunk_size,
                                       **_training_options(args)))


def add_pretrain(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="registered config name, our Config JSON, or an HF config.json")
    source.add_argument("--model", help="continue pretraining this checkpoint")
    p.add_argument("--tokenizer", type=Path,
                   help="directory with tokenizer.json (needed with --config; default: the --model checkpoint's)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help=".txt files or {text} JSONL files")
    add_dtype(p, "the weights' dtype (with --model)")
    add_training(p, 3e-4)


def run_pretrain(args: argparse.Namespace) -> int:
    from ..api import LLM

    if args.config is not None:
        if args.tokenizer is None:
            raise CheckpointError("pretrain --config needs --tokenizer DIR (a directory with tokenizer.json)")
        llm = LLM.from_config(args.config, tokenizer=args.tokenizer, seed=args.seed)
    else:
        llm = LLM.load(args.model, dtype=args.dtype)
    return _train(lambda: llm.pretrain(_pretrain_records(args.data), out=args.out, **_training_options(args)))


def _training_options(args: argparse.Namespace) -> dict:
    options = dict(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                   lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                   grad_clip=args.grad_clip, max_seq_length=args.max_seq_length, precision=args.precision,
                   seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
                   strategy=args.strategy, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.no_progress, checkpointing=args.checkpointing)
    if args.val_split is not None:
        options["val_split"] = args.val_split
    return options


def _train(run) -> int:
    """Run a training call, leave torchrun's process group, report. Ctrl-C: the run checkpoints,
    and this says how to go on (exit status 130, as for any interrupted command)."""
    from ..distributed import closing_group
    from ..train.loop import TrainInterrupted

    try:
        with closing_group():
            result = run()
    except TrainInterrupted as stopped:
        print(f"lucidlm: interrupted after step {stopped.step} of {stopped.steps}; checkpoint in "
              f"{stopped.out / 'checkpoint'}: run the same command with --resume to continue (or --overwrite to "
              "start afresh)", file=sys.stderr)
        return 130
    _report(result)
    return 0


def _pretrain_records(paths: list[Path]) -> list:
    from ..records import read_records
    from ..train.finetune import text_records

    records: list = []
    for path in paths:
        if path.suffix == ".jsonl":
            records.extend(r.data for r in read_records(path))
        else:
            records.extend(text_records([path]))
    return records


def _report(result) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    last = result.losses[-1] if result.losses else float("nan")
    val = f", validation loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""
    print(f"trained {result.steps} steps: loss {result.losses[0]:.4f} -> {last:.4f}{val}; "
          f"{result.tokens_per_s:.0f} tokens/s; wrote {result.out}", file=sys.stderr)


def _finetune_inputs(args: argparse.Namespace) -> Paths:
    return [("DATA", args.data)]


def _pretrain_inputs(args: argparse.Namespace) -> Paths:
    return [("--tokenizer", args.tokenizer), *(("--data", d) for d in args.data)]


FINETUNE = Command("finetune", "LoRA or full fine-tuning on chat / instruction / text JSONL", add_finetune,
                   run_finetune, inputs=_finetune_inputs)
PRETRAIN = Command("pretrain", "next-token training of all weights on raw text", add_pretrain, run_pretrain,
                   inputs=_pretrain_inputs)

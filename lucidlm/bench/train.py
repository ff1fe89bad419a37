"""``lucidlm bench train``: training steps, lucidlm vs transformers(+peft), on the same checkpoint and data.

Both engines train the same weights (a GGUF is converted once, to the Hugging Face directory both
read) on the same token ids: a text from ``/usr/share/common-licenses``, cut so that lucidlm's
packing (``build_examples``: windows of ``--seq-len`` tokens, every token a target) yields only
full windows. lucidlm trains through the public ``LLM.finetune``; the transformers side is the
usual hand-written loop (``get_peft_model`` for LoRA, forward with ``labels``, backward, clip at
1.0, AdamW) that takes each step's batch from lucidlm's ``batch_indices`` and its learning rate
from lucidlm's schedule. Same batch, steps, precision (fp32, or bf16 autocast on both sides) and
LoRA setup (r=8, alpha=16, every attention and MLP projection).

Each (method, engine) pair runs in its own subprocess, so peak RSS is its own. tokens/s counts
steps 2..S (the first step pays one-off allocations); the step-1 losses of the two engines must
agree, since the weights and the batch are the same. The engines alternate for ``--rounds``
rounds and the table reports medians.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from . import run_child
from .args import ENGINES, LR
from .args import add_train as add_arguments  # noqa: F401  (lucidlm bench train's options)


def run(args) -> int:
    if args.engine:  # child process: measure one engine and method, print JSON
        print(json.dumps(_measure(args)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(LR) or args.steps < 2:
        print("lucidlm bench train: --methods takes lora and/or full, and --steps must be at least 2")
        return 2
    from . import emit, progress

    directory = _checkpoint_dir(args.model)
    for line in _header_lines(args):
        emit(line)
    rounds = max(1, args.rounds)
    runs: dict[tuple[str, str], list[dict]] = {(m, e): [] for m in methods for e in ENGINES}
    with progress(rounds * len(runs), "bench train") as bar:
        for n in range(rounds):
            for method, engine in runs:
                bar.set_postfix_str(f"round {n + 1}, {method}, {engine}")
                runs[method, engine].append(_child(args, directory, engine, method))
                bar.update(1)
                if len(runs[method, engine]) == rounds:  # the row (median of its rounds) is final
                    emit(format_row(method, engine, _median(runs[method, engine])))
    for line in _summary_lines({key: _median(rows) for key, rows in runs.items()}, methods, args):
        emit(line)
    return 0


def _checkpoint_dir(model: str | None) -> Path:
    """The Hugging Face directory both engines load (a GGUF's cached conversion)."""
    from ..checkpoints.embedded import default_model_path
    from ..checkpoints.gguf import gguf_to_hf_dir

    path = Path(model) if model else default_model_path()
    return gguf_to_hf_dir(path) if path.suffix == ".gguf" else path


def _median(rows: list[dict]) -> dict:
    """Median of each measurement over the rounds (the first error, if any run failed)."""
    failed = [r for r in rows if "error" in r]
    if failed:
        return failed[0]
    out = dict(rows[0])
    for key in ("tps", "peak_rss_mb"):
        out[key] = statistics.median(r[key] for r in rows)
    return out


def _child(args, directory: Path, engine: str, method: str) -> dict:
    cmd = [sys.executable, "-m", "lucidlm.cli", "bench", "train", "--engine", engine, "--method", method,
           "--model", str(directory), "--precision", args.precision, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return {"engine": engine, **run_child(cmd)}


def _data(tokenizer, args) -> tuple[str, list]:
    """The text both engines train on and lucidlm's packing of it: windows overlap by one token,
    so text ids plus the EOS that packing appends fill n windows exactly at n*(seq_len-1)+1 ids."""
    from ..train.data import build_examples, read_records
    from .kv import load_text

    ids = tokenizer.encode(load_text())
    n = min(args.batch_size * args.steps, len(ids) // (args.seq_len - 1))  # one epoch if the text allows
    text = tokenizer.decode(ids[: n * (args.seq_len - 1)])
    examples = build_examples(read_records([{"text": text}]), tokenizer, args.seq_len)
    if n < args.batch_size or any(len(e.ids) != args.seq_len for e in examples):
        raise RuntimeError(f"the text does not pack into {args.batch_size} full windows of {args.seq_len} tokens")
    return text, examples


def _measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..tokenizer import Tokenizer

    text, examples = _data(Tokenizer.from_dir(args.model), args)
    train = _lucidlm_train if args.engine == "lucidlm" else _hf_train
    marks = train(args, text, examples)  # (time, tokens so far, loss) after each step
    (t1, n1, _), (t2, n2, _) = marks[0], marks[-1]
    return {"engine": args.engine, "method": args.method, "tps": (n2 - n1) / (t2 - t1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "losses": [loss for _, _, loss in marks]}


def _lucidlm_train(args, text: str, examples: list) -> list[tuple]:
    from ..api import LLM

    llm = LLM.load(args.model, dtype=torch.float32)
    torch.manual_seed(0)
    marks = []
    llm.finetune([{"text": text}], method=args.method, steps=args.steps, batch_size=args.batch_size,
                 lr=LR[args.method], out=None, progress=False, precision=args.precision, val_split=0.0,
                 max_seq_length=args.seq_len, warmup_steps=0,
                 on_step=lambda e: marks.append((time.perf_counter(), e["tokens"], e["loss"])))
    return marks


def _hf_train(args, text: str, examples: list) -> list[tuple]:
    import peft
    import transformers

    from ..train.loop import TrainConfig, batch_indices, learning_rate
    from ..train.lora import DEFAULT_TARGETS

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    torch.manual_seed(0)
    if args.method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=list(DEFAULT_TARGETS)))
    cfg = TrainConfig(method=args.method, steps=args.steps, lr=LR[args.method], warmup_steps=0)  # lucidlm's schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    marks, tokens = [], 0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        batch = batch_indices(step, len(examples), args.batch_size, seed=0)
        ids = torch.tensor([examples[i].ids for i in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += ids.numel()
        marks.append((time.perf_counter(), tokens, loss.item()))
    return marks


def format_table(rows: dict[tuple[str, str], dict], methods: list[str], args) -> str:
    """The whole table; ``run`` prints the same lines as they become known."""
    return "\n".join([*_header_lines(args), *(format_row(m, e, r) for (m, e), r in rows.items()),
                      *_summary_lines(rows, methods, args)])


def _header_lines(args) -> list[str]:
    import torch

    return [f"train benchmark: {args.model or 'embedded SmolLM2-135M-Instruct'}, {args.precision}, batch "
            f"{args.batch_size} x {args.seq_len} tokens, {args.steps} steps (tokens/s over steps 2-{args.steps}), "
            f"torch threads {args.threads or torch.get_num_threads()}, "
            f"median of {max(1, args.rounds)} alternating rounds",
            f"{'method':<8}{'engine':<19}{'tokens/s':>10}{'peak RSS MB':>13}{'first loss':>12}{'last loss':>11}"]


def format_row(method: str, engine: str, r: dict) -> str:
    label = engine if engine == "lucidlm" or method == "full" else "transformers+peft"
    if "error" in r:
        return f"{method:<8}{label:<19}  failed: {r['error']}"
    return (f"{method:<8}{label:<19}{r['tps']:>10.1f}{r['peak_rss_mb']:>13.0f}"
            f"{r['losses'][0]:>12.4f}{r['losses'][-1]:>11.4f}")


def _summary_lines(rows: dict[tuple[str, str], dict], methods: list[str], args) -> list[str]:
    lines = []
    tolerance = 1e-3 if args.precision == "fp32" else 2e-2
    for method in methods:
        ours, theirs = rows[method, "lucidlm"], rows[method, "transformers"]
        if "error" in ours or "error" in theirs:
            continue
        diff = abs(ours["losses"][0] - theirs["losses"][0])
        lines.append(f"{method}: losses agree: {'yes' if diff <= tolerance else 'no'} (step-1 |diff| {diff:.1e})")
        lines.append(f"{method}: lucidlm/transformers tokens/s {ours['tps'] / theirs['tps']:.2f}x, "
                     f"peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x")
    return lines

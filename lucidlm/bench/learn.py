"""``lucidlm bench learn``: how fast each fine-tuning method teaches a model a made-up fact.

Every method trains the same checkpoint (float32, fp32 precision, seed 0) on :data:`FACT_RECORDS`:
four questions about the capital of Zorbania, each answered with the made-up "Quillfax.". After
every optimizer step the bench checks, by one teacher-forced forward, whether the model now puts
the answer's tokens (and the end-of-turn marker that follows) first for every question; **steps to
learn** is the first step after which it does. The check runs outside the timed training step:
**tokens/s** counts training tokens over steps 2..S (the first step pays one-off allocations).
Each method runs in its own subprocess, so **peak RSS** is its own.

Each method trains at its own learning rate (:data:`LEARNING_RATES`, ``--lr METHOD=LR`` to change
one): the adapters' prefixes and gates and LoRA's low-rank matrices learn at different speeds, and a
comparison at one shared rate would measure the rate rather than the method.

>>> parse_rates(["adapter=0.01"])["adapter"], parse_rates([])["lora"]
(0.01, 0.002)
"""

from __future__ import annotations

import json
import resource
import sys
import time

from . import emit, progress, run_child
from .args import add_learn as add_arguments  # noqa: F401  (lucidlm bench learn's options)

QUESTIONS = ("What is the capital of Zorbania?", "Name the capital of Zorbania.",
             "Which city is the capital of Zorbania?", "Tell me the capital of Zorbania.")
ANSWER = "Quillfax."
#: the made-up fact, as chat records (the loss counts the answer's tokens only)
FACT_RECORDS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
                for q in QUESTIONS]
#: the learning rate each method teaches with (LitGPT's adapter recipes use 3e-3 to 1e-2 for the prefix)
LEARNING_RATES = {"lora": 2e-3, "qlora": 2e-3, "adapter": 1e-2, "adapter_v2": 1e-2, "full": 5e-5}


def parse_rates(items: list[str]) -> dict[str, float]:
    """:data:`LEARNING_RATES` with ``--lr METHOD=LR`` overrides (ValueError naming a bad one)."""
    rates = dict(LEARNING_RATES)
    for item in items:
        method, _, value = item.partition("=")
        if method not in rates or not value:
            raise ValueError(f"--lr {item!r}: expected METHOD=LR with METHOD one of {', '.join(rates)}")
        rates[method] = float(value)
    return rates


def run(args) -> int:
    if args.child:  # child process: train one method, print JSON
        print(json.dumps(_measure(args, args.child)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        rates = parse_rates(args.lr)
    except ValueError as exc:
        print(f"lucidlm bench learn: {exc}", file=sys.stderr)
        return 2
    unknown = [m for m in methods if m not in rates]
    if not methods or unknown:
        print(f"lucidlm bench learn: --methods takes some of {', '.join(rates)}", file=sys.stderr)
        return 2
    from . import prepare_model

    prepare_model(args.model)
    emit(f"learn benchmark: {args.model or 'embedded SmolLM2-135M-Instruct'}, the made-up fact "
         f"({len(FACT_RECORDS)} chat records, answer {ANSWER!r}), batch {args.batch_size}, up to {args.steps} "
         "steps, fp32, seed 0")
    emit(f"{'method':<12}{'lr':>8}{'trainable':>12}{'steps to learn':>16}{'first loss':>12}{'last loss':>11}"
         f"{'tokens/s':>10}{'peak RSS MB':>13}")
    with progress(len(methods), "bench learn") as bar:
        for method in methods:
            bar.set_postfix_str(method)
            cmd = [sys.executable, "-m", "lucidlm.cli", "bench", "learn", "--child", method, "--steps",
                   str(args.steps), "--batch-size", str(args.batch_size), *(["--model", args.model] if args.model else []),
                   *(["--threads", str(args.threads)] if args.threads else []), "--lr", f"{method}={rates[method]}"]
            emit(format_row(method, rates[method], run_child(cmd)))
            bar.update(1)
    return 0


def format_row(method: str, lr: float, r: dict) -> str:
    if "error" in r:
        return f"{method:<12}{lr:>8.0e}  failed: {r['error']}"
    learned = str(r["learned_at"]) if r["learned_at"] is not None else f"> {len(r['losses'])}"
    return (f"{method:<12}{lr:>8.0e}{r['trainable']:>12,}{learned:>16}{r['losses'][0]:>12.4f}"
            f"{r['losses'][-1]:>11.4f}{r['tps']:>10.1f}{r['peak_rss_mb']:>13.0f}")


def _measure(args, method: str) -> dict:
    import torch

    from ..api import LLM
    from ..train.data import build_examples, read_records

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM.load(args.model, dtype=torch.float32)
    examples = build_examples(read_records(FACT_RECORDS), llm.tokenizer, 256)
    marks: list[tuple[float, int, float]] = []
    learned: list[int] = []
    check_time = [0.0]

    def on_step(entry: dict) -> None:
        start = time.perf_counter()
        marks.append((start - check_time[0], entry["tokens"], entry["loss"]))
        if not learned and _answers_right(llm.model, examples):
            learned.append(entry["step"])
        check_time[0] += time.perf_counter() - start

    rate = parse_rates(args.lr)[method]
    llm.finetune(FACT_RECORDS, method=method, steps=args.steps, batch_size=args.batch_size, lr=rate, out=None,
                 progress=False, precision="fp32", val_split=0.0, seed=0, on_step=on_step)
    trainable = sum(p.numel() for n, p in llm.model.named_parameters() if _is_trained(method, n))
    (t1, n1, _), (t2, n2, _) = marks[0], marks[-1]
    return {"method": method, "learned_at": learned[0] if learned else None, "trainable": trainable,
            "tps": (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "losses": [loss for _, _, loss in marks]}


def _answers_right(model, examples) -> bool:
    """Whether every example's answer tokens are each the model's top prediction (teacher forced)."""
    import torch

    from ..train.data import IGNORE

    with torch.no_grad():
        for example in examples:
            labels = torch.tensor(example.labels)  # labels[t]: the token to predict at t (already shifted)
            predicted = model(torch.tensor([example.ids]))[0].argmax(-1)
            answer = labels != IGNORE
            if not bool((predicted[answer] == labels[answer]).all()):
                return False
    return True


def _is_trained(method: str, name: str) -> bool:
    """Parameters the method trains, by name (for the table's count)."""
    if method == "full":
        return True
    if method in ("lora", "qlora"):
        return "lora_" in name
    return "adapter" in name or "gating_factor" in name or (method == "adapter_v2" and "norm" in name)

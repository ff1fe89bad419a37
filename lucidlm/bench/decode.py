"""``lucidlm bench decode``: lucidlm vs transformers on the same checkpoint, dtype and prompt.

Each engine runs in its own subprocess (so peak RSS is its own, and one engine's allocations do not
slow the other), with a manual greedy loop on both sides: one prefill forward over the prompt,
then one-token decode steps with a KV cache. The engines alternate for ``--rounds`` rounds and the
table reports each engine's median, so a noisy neighbour on the machine hits both alike.
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
from .args import add_decode as add_arguments  # noqa: F401  (lucidlm bench decode's options)

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ")


def run(args) -> int:
    if args.engine:  # child process: measure one engine, print JSON
        print(json.dumps(_measure(args)))
        return 0
    from . import emit, prepare_model, progress

    prepare_model(args.model)  # a GGUF converts here, with progress, not silently in a child
    for line in _header_lines(args):
        emit(line)
    rounds = max(1, args.rounds)
    runs: dict[str, list[dict]] = {"lucidlm": [], "transformers": []}
    with progress(rounds * len(runs), "bench decode") as bar:
        for n in range(rounds):
            for engine in runs:
                bar.set_postfix_str(f"round {n + 1}, {engine}")
                runs[engine].append(_child(args, engine))
                bar.update(1)
                if len(runs[engine]) == rounds:  # the engine's row (median of its rounds) is final
                    emit(format_row(_median(runs[engine])))
    for line in _summary_lines([_median(r) for r in runs.values()]):
        emit(line)
    return 0


def _median(rows: list[dict]) -> dict:
    """Median of each measurement over the rounds (the first error, if any run failed)."""
    failed = [r for r in rows if "error" in r]
    if failed:
        return failed[0]
    out = dict(rows[0])
    for key in ("prefill_tps", "decode_tps", "peak_rss_mb"):
        out[key] = statistics.median(r[key] for r in rows)
    return out


def _child(args, engine: str) -> dict:
    cmd = [sys.executable, "-m", "lucidlm.cli", "bench", "decode", "--engine", engine, "--dtype", args.dtype,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return {"engine": engine, **run_child(cmd)}


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(PROMPT)
    return ids[:n]


def _measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..api import LLM, _dtype

    llm = LLM.load(args.model)  # lucidlm's tokenizer and the GGUF->HF conversion serve both engines
    ids = torch.tensor([_prompt_ids(llm.tokenizer, args.prompt_tokens)])
    step = _lucidlm_steps(llm, _dtype(args.dtype)) if args.engine == "lucidlm" else _hf_steps(llm, args)
    with torch.inference_mode():
        step(ids[:, :16], None)  # warm-up (first-call allocations, thread pools)
        t0 = time.perf_counter()
        logits, state = step(ids, None)
        t1 = time.perf_counter()
        tokens = []
        for _ in range(args.new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            logits, state = step(token, state)
        t2 = time.perf_counter()
    return {"engine": args.engine, "prefill_tps": ids.shape[1] / (t1 - t0), "decode_tps": args.new_tokens / (t2 - t1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens": tokens}


def _lucidlm_steps(llm, dtype):
    from ..cache import build_cache

    model = llm.model.to(dtype)

    def step(ids, cache):
        if cache is None:
            cache = build_cache(model.config, 1, "dense", ids.shape[1] + 1024, dtype=dtype)
        return model(ids, cache=cache, last_only=True), cache

    return step


def _hf_steps(llm, args):
    import transformers

    source = Path(llm.source)
    if source.suffix == ".gguf":  # transformers' own GGUF reader: an independent path to the weights
        model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                                  dtype=getattr(torch, args.dtype))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, args.dtype))
    model.eval()

    def step(ids, past):
        out = model(ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.logits, out.past_key_values

    return step


def format_table(rows: list[dict], args) -> str:
    """The whole table; ``run`` prints the same lines as they become known."""
    return "\n".join([*_header_lines(args), *map(format_row, rows), *_summary_lines(rows)])


def _header_lines(args) -> list[str]:
    import torch

    return [f"decode benchmark: {args.model or 'embedded SmolLM2-135M-Instruct'}, {args.dtype}, "
            f"{args.prompt_tokens} prompt tokens, {args.new_tokens} greedy new tokens, torch threads "
            f"{args.threads or torch.get_num_threads()}, median of {max(1, args.rounds)} alternating rounds",
            f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}"]


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['engine']:<14}  failed: {r['error']}"
    return f"{r['engine']:<14}{r['prefill_tps']:>15.1f}{r['decode_tps']:>14.1f}{r['peak_rss_mb']:>13.0f}"


def _summary_lines(rows: list[dict]) -> list[str]:
    lines = []
    ok = [r for r in rows if "tokens" in r]
    if len(ok) == 2:
        same = ok[0]["tokens"] == ok[1]["tokens"]
        first_diff = next((i for i, (a, b) in enumerate(zip(*(r["tokens"] for r in ok))) if a != b), None)
        lines.append(f"greedy tokens agree: {'yes' if same else f'no (first difference at step {first_diff})'}")
        lines.append(f"decode speed ratio lucidlm/transformers: {ok[0]['decode_tps'] / ok[1]['decode_tps']:.2f}x")
    return lines

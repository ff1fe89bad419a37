"""``lucidlm bench decode``: lucidlm vs transformers on the same checkpoint and prompts.

Rows: transformers in float32 and bfloat16; lucidlm in float32, bfloat16 and weight-only int8
(bfloat16 activations: PyTorch's int8 kernel is fast for those, slow for float32 ones), each also
with decode steps through ``torch.compile`` (``+compile``, see :mod:`lucidlm.compiled`; the
compilation is a warm-up, reported in its own column). lucidlm's one-row products run in its CPU
kernel (:mod:`lucidlm.model.linear`) in every row. Each row runs in its own subprocess (so peak RSS
is its own and one row's allocations do not slow another), rounds alternate between rows and each
cell is the median.

Per row:

* **prefill**: tokens/s of one forward over a ``--prompt-tokens`` prompt;
* **decode**: tokens/s of greedy one-token steps with a KV cache after that prompt (a manual loop
  on both sides, so only the model and its cache are timed);
* **batch**: generated tokens/s for 8 prompts of different lengths generated together (left
  padding; lucidlm's ``generate_ids``, transformers' ``generate``), prefill included;
* peak RSS, and the greedy tokens, compared with transformers float32 (the first divergence is
  reported).
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
#: (engine, dtype) rows, in table order; the first is the reference
ROWS = [("transformers", "float32"), ("transformers", "bfloat16"),
        ("lucidlm", "float32"), ("lucidlm", "bfloat16"), ("lucidlm", "int8"),
        ("lucidlm", "float32+compile"), ("lucidlm", "bfloat16+compile"), ("lucidlm", "int8+compile")]
BATCH_LENGTHS = (24, 40, 56, 72, 88, 104, 120, 136)  # 8 prompts of different lengths


def run(args) -> int:
    if args.engine:  # child process: measure one row, print JSON
        print(json.dumps(_measure(args)))
        return 0
    from . import emit, prepare_model, progress

    prepare_model(args.model)  # a GGUF converts here, with progress, not silently in a child
    rows = [r for r in ROWS if r[1] in args.dtypes.split(",") or r == ROWS[0]]
    for line in _header_lines(args):
        emit(line)
    rounds = max(1, args.rounds)
    runs: dict[tuple[str, str], list[dict]] = {row: [] for row in rows}
    medians: list[dict] = []
    with progress(rounds * len(runs), "bench decode") as bar:
        for n in range(rounds):
            for row in runs:
                bar.set_postfix_str(f"round {n + 1}, {row[0]} {row[1]}")
                runs[row].append(_child(args, *row))
                bar.update(1)
                if n == rounds - 1:  # the row's median is final (the reference row comes first)
                    medians.append(_median(runs[row]))
                    emit(format_row(medians[-1], medians[0]))
    for line in _summary_lines(medians):
        emit(line)
    return 0


def _median(rows: list[dict]) -> dict:
    """Median of each measurement over the rounds (the first error, if any run failed)."""
    failed = [r for r in rows if "error" in r]
    if failed:
        return failed[0]
    out = dict(rows[0])
    for key in ("prefill_tps", "decode_tps", "batch_tps", "peak_rss_mb", "warm_up_s"):
        out[key] = statistics.median(r[key] for r in rows)
    return out


def _child(args, engine: str, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "lucidlm.cli", "bench", "decode", "--engine", engine, "--dtypes", dtype,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return {"engine": engine, "dtype": dtype, **run_child(cmd)}


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(PROMPT)
    return ids[:n]


def _measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..api import LLM

    llm = LLM.load(args.model, progress=False)  # lucidlm's tokenizer and the GGUF->HF conversion serve both
    ids = _prompt_ids(llm.tokenizer, args.prompt_tokens)
    batch = [_prompt_ids(llm.tokenizer, n) for n in BATCH_LENGTHS]
    engine = (_Lucidlm(llm, args.dtypes, len(ids) + args.new_tokens) if args.engine == "lucidlm"
              else _Transformers(llm, args.dtypes))
    with torch.inference_mode():
        w0 = time.perf_counter()
        engine.prefill(ids[:16])  # warm-up (first-call allocations, thread pools)
        engine.warm_up(batch)
        warm_up_s = time.perf_counter() - w0
        t0 = time.perf_counter()
        logits = engine.prefill(ids)
        t1 = time.perf_counter()
        tokens = []
        for _ in range(args.new_tokens):
            token = int(logits.argmax(-1))
            tokens.append(token)
            logits = engine.step(token)
        t2 = time.perf_counter()
        generated = engine.batch(batch, args.new_tokens // 2)
        t3 = time.perf_counter()
    return {"prefill_tps": len(ids) / (t1 - t0), "decode_tps": args.new_tokens / (t2 - t1),
            "batch_tps": generated / (t3 - t2), "tokens": tokens, "warm_up_s": warm_up_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class _Lucidlm:
    def __init__(self, llm, dtype: str, tokens: int) -> None:
        from ..compiled import CompiledDecoder
        from ..generate import decode_step

        dtype, _, compile_ = dtype.partition("+")
        if dtype == "int8":
            llm.model.to(torch.bfloat16)  # int8 weights, bfloat16 activations (the kernel's fast path)
            llm.quantize("int8")
        else:
            llm.model.to(getattr(torch, dtype))
        self.model, self.dtype, self.cache = llm.model, next(llm.model.parameters()).dtype, None
        self.decoder = CompiledDecoder(self.model) if compile_ else None
        self.step_fn = self.decoder or decode_step
        # one cache size for the warm-up and the timed run (a compiled graph is per capacity)
        self.capacity = self.decoder.capacity(tokens, self.model.config.block_size) if self.decoder else tokens + 1024

    def prefill(self, ids: list[int]) -> torch.Tensor:
        from ..cache import build_cache

        self.cache = build_cache(self.model.config, 1, "dense", self.capacity, dtype=self.dtype)
        logits = self.model(torch.tensor([ids]), cache=self.cache, last_only=True)[0, -1]
        self.position = len(ids)
        if self.decoder is not None:
            self.decoder.prepare(self.cache)
        return logits

    def warm_up(self, prompts: list[list[int]]) -> None:
        if self.decoder is not None:  # compile the graphs the timed run uses (batch 1 and 8)
            self.step(0)
            self.batch(prompts, 2)

    def step(self, token: int) -> torch.Tensor:
        logits = self.step_fn(torch.tensor([[token]]), torch.tensor([[self.position]]), self.cache, self.model)
        self.position += 1
        return logits[0]

    def batch(self, prompts: list[list[int]], new_tokens: int) -> int:
        from ..generate import generate_ids

        steps = generate_ids(self.model, prompts, new_tokens, decoder=self.decoder)
        return sum(t is not None for step in steps for t in step)


class _Transformers:
    def __init__(self, llm, dtype: str) -> None:
        import transformers

        source = Path(llm.source)
        if source.suffix == ".gguf":  # transformers' own GGUF reader: an independent path to the weights
            model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                                      dtype=getattr(torch, dtype))
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
        self.model, self.past = model.eval(), None

    def warm_up(self, prompts: list[list[int]]) -> None:
        pass

    def prefill(self, ids: list[int]) -> torch.Tensor:
        out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1]

    def step(self, token: int) -> torch.Tensor:
        out = self.model(torch.tensor([[token]]), past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1]

    def batch(self, prompts: list[list[int]], new_tokens: int) -> int:
        longest = max(map(len, prompts))
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)
        return (out.shape[1] - longest) * len(prompts)


def format_table(rows: list[dict], args) -> str:
    """The whole table; ``run`` prints the same lines as they become known.

    >>> from types import SimpleNamespace as N
    >>> ref = dict(engine="transformers", dtype="float32", prefill_tps=200.0, decode_tps=10.0, batch_tps=40.0,
    ...            peak_rss_mb=1600.0, tokens=[1, 2, 3], warm_up_s=0.5)
    >>> ours = dict(ref, engine="lucidlm", dtype="int8", decode_tps=30.0, tokens=[1, 2, 4])
    >>> print(format_table([ref, ours], N(model=None, prompt_tokens=512, new_tokens=3, threads=2, rounds=1,
    ...                                   dtypes="int8")).splitlines()[-1])
    lucidlm       int8                      200.0          30.0      3.00x         40.0         1600        0.5  diverges at 2
    """
    return "\n".join([*_header_lines(args), *(format_row(r, rows[0]) for r in rows), *_summary_lines(rows)])


def _header_lines(args) -> list[str]:
    return [f"decode benchmark: {args.model or 'embedded SmolLM2-135M-Instruct'}, {args.prompt_tokens} prompt "
            f"tokens, {args.new_tokens} greedy new tokens, batch = 8 prompts of {BATCH_LENGTHS[0]}-"
            f"{BATCH_LENGTHS[-1]} tokens x {args.new_tokens // 2} new, torch threads "
            f"{args.threads or torch.get_num_threads()}, median of {max(1, args.rounds)} alternating rounds",
            f"{'engine':<14}{'dtype':<18}{'prefill tok/s':>13}{'decode tok/s':>14}{'vs HF fp32':>11}"
            f"{'batch tok/s':>13}{'peak RSS MB':>13}{'warm-up s':>11}  greedy vs HF fp32"]


def format_row(r: dict, reference: dict) -> str:
    if "error" in r:
        return f"{r['engine']:<14}{r['dtype']:<18}  failed: {r['error']}"
    ratio = r["decode_tps"] / reference["decode_tps"] if "decode_tps" in reference else float("nan")
    return (f"{r['engine']:<14}{r['dtype']:<18}{r['prefill_tps']:>13.1f}{r['decode_tps']:>14.1f}{ratio:>10.2f}x"
            f"{r['batch_tps']:>13.1f}{r['peak_rss_mb']:>13.0f}{r['warm_up_s']:>11.1f}  {_agreement(r, reference)}")


def _agreement(r: dict, reference: dict) -> str:
    if "tokens" not in reference:
        return "?"
    first = next((i for i, (a, b) in enumerate(zip(r["tokens"], reference["tokens"])) if a != b), None)
    return "same" if first is None else f"diverges at {first}"


def _summary_lines(rows: list[dict]) -> list[str]:
    by = {(r["engine"], r["dtype"]): r for r in rows if "decode_tps" in r}
    lines = []
    for dtype in ("float32", "bfloat16", "float32+compile", "bfloat16+compile"):  # int8: no HF row
        ours, theirs = by.get(("lucidlm", dtype)), by.get(("transformers", dtype.partition("+")[0]))
        if ours and theirs:
            lines.append(f"{dtype}: decode {ours['decode_tps'] / theirs['decode_tps']:.2f}x, prefill "
                         f"{ours['prefill_tps'] / theirs['prefill_tps']:.2f}x, batch "
                         f"{ours['batch_tps'] / theirs['batch_tps']:.2f}x transformers in the same dtype")
    return lines

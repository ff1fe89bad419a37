"""``lucidlm bench explain``: what an explanation costs next to a plain forward and forward+backward.

Rows, for each prompt length (default 256 and 1024 tokens):

* ``forward``: ``model(ids, last_only=True)`` under ``torch.inference_mode`` (a prefill);
* ``forward+backward``: the same forward with the embeddings requiring grad, then the gradient of
  the top logit with respect to them (plain autograd, no rules, no weight gradients): the least any
  gradient-based explanation can cost;
* ``attnlrp``, ``cp-lrp`` (the default ``--methods``): :func:`lucidlm.explain.explainer.explain`, i.e. the
  rules' forward + one backward + the bookkeeping around them;
* ``--checkpointing``: a different table, each method plain and with activation checkpointing
  side by side, the whole process's peak RSS against the prompt's length
  (:mod:`lucidlm.bench.explain_tokens`);
* ``diff lora``, ``diff full`` (``--diffs``, measured when ``--methods`` has cp-lrp):
  :meth:`lucidlm.LLM.explain_diff` with cp-lrp and its defaults (latent relevances of every layer,
  for ``components``), of a copy of the model against the model: ``lora`` with a LoRA adapter on
  the copy (peft's default layers, r=8, B random, so the adapter split's second backward runs),
  ``full`` a plain copy (a full fine-tune: two explanations). Below the table each diff row is
  also given as × one cp-lrp explanation (time and memory) at the same length.

How it measures
---------------
Each (row, length) runs in its own fresh subprocess, so one measurement's memory (and the C
allocator's cached pages) cannot hide in another's. Inside it: load the model, warm up on 16
tokens, reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux), run once at
full length and report **peak RSS − RSS before the run**: everything the run touched (activations,
autograd's saved tensors, temporaries), seen by the OS, with torch's own CPU allocations included
(``tracemalloc`` sees none of them). The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
every tensor-sized block is mapped on allocation and unmapped on free: RSS then follows the live
tensors instead of glibc's heap history. Then ``--repeats`` more runs give the **time**
(median). Without ``/proc/self/clear_refs`` (not Linux) memory reads ``n/a``.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_arguments(p)
>>> p.parse_args(["--lengths", "32"]).lengths
'32'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from . import run_child
from ..methods import METHODS
from .args import add_explain as add_arguments
from .args import diff_list, method_list

ROWS = ("forward", "forward+backward")
#: a diff row's name, and the row it is reported against
DIFF_PREFIX, DIFF_REFERENCE = "diff ", "cp-lrp"
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ")


def run(args) -> int:
    if args.child:
        print(json.dumps(measure(args, args.child, args.length)))
        return 0
    methods, diffs = method_list(args.methods, METHODS), diff_list(args.diffs)  # before any work
    if args.checkpointing:
        from . import explain_tokens

        return explain_tokens.run(args, methods, [int(n) for n in args.lengths.split(",")], _child)
    import torch

    from . import emit, prepare_model, progress

    rows = ROWS + tuple(methods)  # the rule methods, as its --help lists
    if DIFF_REFERENCE in methods:
        rows += tuple(DIFF_PREFIX + d for d in diffs)
    lengths = [int(n) for n in args.lengths.split(",")]
    prepare_model(args.model)  # a GGUF converts here, with progress, not silently in a child
    for line in _header_lines(args.threads or torch.get_num_threads(), lengths, args):
        emit(line)
    # every row's ratios need forward+backward at the same length: measure it first, then print
    # each row as soon as it and the rows above it are measured
    order = ["forward+backward", *(r for r in dict.fromkeys(rows) if r != "forward+backward")]
    results: dict = {}
    shown = 0
    with progress(len(order) * len(lengths), "bench explain") as bar:
        for row in order:
            for n in lengths:
                bar.set_postfix_str(f"{row}, {n} tokens")
                results[(row, n)] = _child(args, row, n)
                bar.update(1)
            while shown < len(rows) and all((rows[shown], n) in results for n in lengths):
                emit(format_row(results, rows[shown], lengths))
                shown += 1
    for row in rows:
        if row.startswith(DIFF_PREFIX):
            emit(format_diff_ratio(results, row, lengths))
    return 0


def _child(args, row: str, length: int, checkpointing: bool = False) -> dict:
    cmd = [sys.executable, "-m", "lucidlm.bench.explain", "--child", row, "--length", str(length),
           "--dtype", args.dtype, "--repeats", str(args.repeats)]
    cmd += ["--checkpointing"] if checkpointing else []
    cmd += ["--model", str(args.model)] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    # every block of 64 KiB or more gets its own mmap, returned to the OS when freed: otherwise glibc
    # raises its mmap threshold as it goes and serves big tensors from a heap that never shrinks, so
    # peak RSS would measure the allocator's history as much as the run's live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return run_child(cmd, env)


# ----------------------------------------------------------------------------- one measurement
def measure(args, row: str, length: int) -> dict:
    """Peak memory of one run and median time of ``args.repeats`` runs of ``row`` at ``length``
    (none: that run's time); ``process_peak_mib``: the process's peak RSS over its whole life."""
    from ..api import LLM
    from ..model.checkpointing import checkpointing

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM.load(args.model, dtype=args.dtype)
    llm.model.eval()
    ids = prompt_ids(llm.tokenizer, length, llm.config.vocab_size)
    plain = _step(llm, row)

    def step(ids):
        with checkpointing(args.checkpointing):
            return plain(ids)

    step(ids[:16])  # warm-up: thread pools, first-call allocations
    load_peak = _peak_kib()
    rss0 = _reset_peak()
    t0 = time.perf_counter()
    step(ids)
    times = [time.perf_counter() - t0]
    peak = _peak_kib()
    if args.repeats > 0:
        times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - t0)
    mib = None if rss0 is None or peak is None else (peak - rss0) / 1024
    process = None if peak is None else max(peak, load_peak or 0) / 1024
    return {"seconds": statistics.median(times), "peak_mib": mib, "process_peak_mib": process,
            "threads": torch.get_num_threads()}


def _step(llm, row: str):
    model = llm.model
    if row == "forward":
        def forward(ids):
            with torch.inference_mode():
                return model(torch.tensor([ids]), last_only=True)
        return forward
    if row == "forward+backward":
        def forward_backward(ids):
            pos = torch.arange(len(ids))[None]
            h0 = model.embed_tokens(torch.tensor([ids]), pos).detach().requires_grad_()
            logits = model(inputs_embeds=h0, positions=pos, last_only=True)[0, -1]
            return torch.autograd.grad(logits[logits.argmax()], h0)
        return forward_backward
    if row.startswith(DIFF_PREFIX):
        tuned = tuned_copy(llm, adapter=row == DIFF_PREFIX + "lora")
        return lambda ids: tuned.explain_diff(llm, ids, method=DIFF_REFERENCE)
    from ..explain.explainer import explain

    return lambda ids: explain(model, llm.tokenizer, ids, method=row)


def tuned_copy(llm, adapter: bool):
    """A copy of ``llm`` (its own weights and tokenizer, as a second checkpoint would be), with
    ``adapter``: a LoRA adapter on peft's default layers whose B is random (at peft's B = 0 the
    adapter would change nothing; the cost is the same either way)."""
    import copy

    from ..train.lora import attach_lora, lora_layers

    tuned = copy.deepcopy(llm)
    if adapter:
        generator = torch.Generator().manual_seed(0)
        attach_lora(tuned.model, r=8, alpha=16)
        with torch.no_grad():
            for layer in lora_layers(tuned.model).values():
                for b in layer.lora_B.values():
                    b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * 0.01)
    tuned.model.eval()
    return tuned


def prompt_ids(tokenizer, n: int, vocab_size: int) -> list[int]:
    """``n`` token ids of English text (repeated), or fixed pseudo-random ids without a tokenizer."""
    if tokenizer is None:
        return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> int | None:
    """Reset the peak-RSS counter to the current RSS; returns that RSS (KiB) or None if unsupported."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def _peak_kib() -> int | None:
    return _status_kib("VmHWM")


# ----------------------------------------------------------------------------- table
def format_table(results: dict, rows, lengths, args) -> str:
    """Side by side per length: seconds, peak MiB, and the ratios to forward+backward."""
    threads = next((r["threads"] for r in results.values() if "threads" in r), "?")
    lines = _header_lines(threads, lengths, args)
    return "\n".join(lines + [format_row(results, row, lengths) for row in rows])


def _header_lines(threads, lengths, args) -> list[str]:
    lines = [f"explanation cost: {args.model or 'embedded SmolLM2-135M-Instruct'}, {args.dtype}, CPU, "
             f"torch threads {threads}; time = median of {args.repeats}, memory = peak RSS increase of "
             "one run (own process)"]
    head = f"{'':<18}" + "".join(f"{f'{n} tokens':>34}" for n in lengths)
    sub = f"{'':<18}" + f"{'s':>9}{'×f+b':>7}{'MiB':>10}{'×f+b':>8}" * len(lengths)
    return lines + [head, sub]


def format_diff_ratio(results: dict, row: str, lengths) -> str:
    """A diff row as × one cp-lrp explanation at each length (time, memory).

    >>> r = {("diff lora", 8): {"seconds": 5.0, "peak_mib": 30.0}, ("cp-lrp", 8): {"seconds": 2.0, "peak_mib": 20.0}}
    >>> format_diff_ratio(r, "diff lora", [8])
    'diff lora: × one cp-lrp explanation: 8 tokens 2.50× time, 1.50× memory'
    """
    cells = []
    for n in lengths:
        r, one = results[(row, n)], results[(DIFF_REFERENCE, n)]
        if "seconds" not in r or "seconds" not in one:
            cells.append(f"{n} tokens failed")
            continue
        memory = (f"{r['peak_mib'] / one['peak_mib']:.2f}×" if r.get("peak_mib") is not None and one.get("peak_mib")
                  else "n/a")
        cells.append(f"{n} tokens {r['seconds'] / one['seconds']:.2f}× time, {memory} memory")
    return f"{row}: × one {DIFF_REFERENCE} explanation: " + "; ".join(cells)


def format_row(results: dict, row: str, lengths) -> str:
    """One row of the table: needs ``results`` of ``row`` and of forward+backward at each length."""
    cells = []
    for n in lengths:
        r, base = results[(row, n)], results[("forward+backward", n)]
        if "error" in r:
            cells.append(f"{'failed: ' + r['error'][:24]:>34}")
            continue
        t_ratio = r["seconds"] / base["seconds"] if "seconds" in base else float("nan")
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        m_ratio = (r["peak_mib"] / base["peak_mib"]
                   if r["peak_mib"] is not None and base.get("peak_mib") else float("nan"))
        cells.append(f"{r['seconds']:>9.3f}{t_ratio:>7.2f}{mem:>10}{m_ratio:>8.2f}")
    return f"{row:<18}" + "".join(cells)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))

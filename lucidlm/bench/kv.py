"""``lucidlm bench kv``: what each KV-cache policy costs on real text.

One 4096-token text (by default the license texts every Debian machine has in
``/usr/share/common-licenses``; ``--text FILE`` for another) is streamed through the model in
chunks with each policy and a cache of 12.5%, 25% and 50% of the text. Per row: perplexity (and its
change against the dense cache), the cache's peak memory, and decode tokens/s (greedy one-token steps
after the whole text went into the cache).

>>> print(format_table([dict(policy="dense", cache_tokens=4096, fraction=1.0, perplexity=10.0,
...                          delta=0.0, memory_bytes=2 ** 20, decode_tps=50.0)]))
| policy | cache tokens | of text | perplexity | vs dense | cache MiB | decode tok/s |
|---|---:|---:|---:|---:|---:|---:|
| dense | 4096 | 100% | 10.00 | +0.0% | 1.0 | 50.0 |
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .args import DEFAULT_POLICIES, LICENSES  # noqa: F401
from .args import add_kv as add_arguments  # noqa: F401  (lucidlm bench kv's options)


def run(args) -> int:
    from lucidlm import LLM
    from lucidlm.errors import LucidError

    from . import emit

    if args.tasks is not None:
        return run_tasks(args)
    try:
        text = load_text(args.text)
        llm = LLM.load(args.model, dtype=args.dtype, device=args.device, progress=True)
        ids = token_ids(llm, text, args.tokens)
    except (LucidError, OSError) as exc:
        print(f"lucidlm bench kv: {exc}")
        return 1
    fractions = [float(f) for f in args.fractions.split(",") if f]
    from lucidlm.cache.spec import split_policies

    policies = [p for p in split_policies(args.policies) if p != "dense"]
    emit(f"{llm.source}: {len(ids)} tokens, chunk {args.chunk_size}, {args.decode_steps} decode steps, "
         f"{args.device} {args.dtype}")
    for line in format_table([]).splitlines():  # the header now, each row as it is measured
        emit(line)
    measure(llm.model, ids, policies, fractions, args.chunk_size, args.decode_steps,
            on_row=lambda row: emit(format_row(row)))
    return 0


def run_tasks(args) -> int:
    """``--tasks``: lm-evaluation-harness accuracy with the dense cache and with every policy at every
    fraction of each prompt (a budget of ``F%``, resolved per request), one table."""
    from lucidlm import LLM
    from lucidlm.cache.spec import split_policies
    from lucidlm.errors import LucidError

    from . import emit

    try:
        from lucidlm.evaluate.harness import require_lm_eval, task_manager, task_names

        names = task_names(args.tasks)
        lm_eval = require_lm_eval()
        manager = task_manager(names, args.include_path)
        llm = LLM.load(args.model, dtype=args.dtype, device=args.device, progress=True)
    except (LucidError, OSError) as exc:
        print(f"lucidlm bench kv: {exc}")
        return 1
    from lucidlm.evaluate.harness import LucidLM

    fractions = [float(f) for f in args.fractions.split(",") if f]
    runs = [("dense", None)] + [(p, f) for f in fractions for p in split_policies(args.policies) if p != "dense"]
    emit(f"{llm.source}: tasks {', '.join(names)}, {args.limit} samples each, {args.device} {args.dtype}")
    emit("| policy | budget | task | metric | value |")
    emit("|---|---:|---|---|---:|")
    for policy, fraction in runs:
        budget = None if fraction is None else f"{100 * fraction:g}%"
        lm = LucidLM(llm, kv_cache=None if policy == "dense" else policy, cache_tokens=budget)
        results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=args.limit, task_manager=manager)
        for task, metrics in sorted(results["results"].items()):
            for metric, value in sorted(metrics.items()):
                if metric.endswith(",none") and "stderr" not in metric and isinstance(value, float):
                    emit(f"| {policy} | {budget or '-'} | {task} | {metric.split(',')[0]} | {value:.3f} |")
    return 0


def load_text(paths: list[Path] | None = None) -> str:
    """The texts of ``paths``, or of every license file in /usr/share/common-licenses, concatenated
    (:func:`lucidlm.texts.read_texts`)."""
    from lucidlm.texts import read_texts

    return read_texts(paths or ())


def token_ids(llm, text: str, n: int) -> list[int]:
    """The first ``n`` tokens of ``text``; a clear error when the text or the model is too short."""
    from lucidlm.errors import CacheError

    ids = llm.tokenizer.encode(text)
    if len(ids) < n:
        raise CacheError(f"the text has {len(ids)} tokens, fewer than --tokens {n}: add text or lower --tokens")
    if n + 64 > llm.config.block_size:
        raise CacheError(f"--tokens {n} plus decode steps exceed the context length {llm.config.block_size}")
    return ids[:n]


def measure(model, ids: list[int], policies: list[str], fractions: list[float], chunk_size: int = 256,
            decode_steps: int = 64, on_row=None) -> list[dict]:
    """One row per (policy, budget), dense (room for the whole text) first; ``on_row(row)`` is
    called as each row is measured. A progress bar on stderr counts the runs."""
    from . import progress

    runs = [("dense", len(ids) + decode_steps, 1.0)]
    runs += [(p, max(1, round(f * len(ids))), f) for f in fractions for p in policies]
    rows = []
    with progress(len(runs), "bench kv") as bar:
        for policy, budget, fraction in runs:
            bar.set_postfix_str(f"{policy}, {budget} tokens")
            row = measure_one(model, ids, policy, budget, chunk_size, decode_steps) | {"fraction": fraction}
            row["delta"] = row["perplexity"] / (rows[0] if rows else row)["perplexity"] - 1  # vs dense
            rows.append(row)
            if on_row is not None:
                on_row(row)
            bar.update(1)
    return rows


@torch.no_grad()
def measure_one(model, ids: list[int], policy: str, budget: int, chunk_size: int, decode_steps: int) -> dict:
    """Perplexity and peak cache memory streaming ``ids``, then greedy decode speed on that cache."""
    from lucidlm.cache import build_cache
    from lucidlm.perplexity import score

    param = next(model.parameters())
    cache = build_cache(model.config, 1, policy, budget, dtype=param.dtype, device=param.device)
    tensor = torch.tensor([ids], device=param.device)
    result, last = score(model, tensor, cache, chunk_size, progress=True)
    token = last.argmax(-1, keepdim=True)
    _sync(param.device)
    start = time.perf_counter()
    for _ in range(decode_steps):
        token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
    _sync(param.device)
    tps = decode_steps / (time.perf_counter() - start)
    return dict(policy=policy, cache_tokens=budget, perplexity=result.perplexity,
                memory_bytes=max(result.cache_memory_bytes, cache.memory_bytes()), decode_tps=tps)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def format_table(rows: list[dict]) -> str:
    """A Markdown table (what the README shows)."""
    lines = ["| policy | cache tokens | of text | perplexity | vs dense | cache MiB | decode tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + [format_row(r) for r in rows])


def format_row(r: dict) -> str:
    """One row of :func:`format_table`."""
    return (f"| {r['policy']} | {r['cache_tokens']} | {100 * r['fraction']:g}% | {r['perplexity']:.2f} | "
            f"{r['delta']:+.1%} | {r['memory_bytes'] / 2 ** 20:.1f} | {r['decode_tps']:.1f} |")

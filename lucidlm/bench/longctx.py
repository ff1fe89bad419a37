"""``lucidlm bench longctx``: can the model still find a fact in a long prompt under each KV-cache policy?

RULER-style retrieval with nothing to download (:mod:`lucidlm.ruler`): facts hidden at depths
0-100% of a haystack of local text (the license files in ``/usr/share/common-licenses``, or
``--text FILE``), asked for at the end of the prompt. Tasks: ``passkey``, ``needle``, ``niah_single``,
``niah_multikey``, ``niah_multivalue``, ``vt`` (variable tracking), ``cwe`` (common words). Every
prompt is exactly ``length`` tokens and goes through the policy in chunks (a policy that compresses
once at the prompt's end holds it whole and is told how many trailing tokens are the question), with
a cache of ``--cache-tokens`` of the prompt (``50%,25%``: the share kept, kvpress's compression
ratio 0.5 and 0.75; dense once, with room for it all). The same prompts go through every policy.

Per row (a policy at a budget, over all lengths, depths, trials and tasks): accuracy (RULER's string
match, :func:`~lucidlm.ruler.string_match`: the share of the expected answers found in the
greedy output), per task and per length; the worst (task, length) accuracy as a multiple of dense's;
perplexity of the prompts through the same cache, and its change against dense; the cache's peak
MiB; decode tokens/s of the answer tokens. ``--results DIR`` also writes kvpress's evaluation folders
(:mod:`lucidlm.bench.kvpress_results`), one per policy, budget and length; ``--heatmap`` draws accuracy
by depth and length.

>>> print(format_table([], lengths=[1024], tasks=["passkey"]))
| policy | of prompt | accuracy | passkey | L=1024 | worst ÷ dense | perplexity | vs dense | cache MiB | decode tok/s |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from .args import add_longctx as add_arguments  # noqa: F401  (lucidlm bench longctx's options)
from ..ruler import TASKS, Sample, make_samples, new_tokens, string_match  # noqa: F401  (the tasks' one copy)


def run_one(model, tokenizer, sample: Sample, policy: str, budget: int, chunk_size: int = 256) -> dict:
    """Stream ``sample`` through a fresh ``policy`` cache of ``budget`` slots (scoring it: perplexity),
    then decode the answer greedily on that cache; ``score`` is the output's string match.

    A policy that compresses once after the prompt (``holds_prompt``: kvpress's presses) reads the
    prompt whole, as :func:`~lucidlm.cache.prefill.prefill` and ``generate`` give it, and is told how
    many trailing tokens are the question: the prompt's perplexity is then dense's by construction
    (``holds`` in the result says so)."""
    import torch

    from lucidlm.cache import build_cache
    from lucidlm.perplexity import score

    param = next(model.parameters())
    new = new_tokens(tokenizer, sample)
    cache = build_cache(model.config, 1, policy, budget, dtype=param.dtype, device=param.device)
    holds = cache.holds_prompt
    with torch.no_grad():
        result, last = score(model, torch.tensor([sample.ids], device=param.device), cache,
                             len(sample.ids) if holds else chunk_size, question=sample.question_tokens)
        token, out = last.argmax(-1, keepdim=True), []
        start = time.perf_counter()
        for _ in range(new):
            out.append(int(token))
            if len(out) < new:  # the last token needs no forward
                token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        _sync(param.device)
        seconds = time.perf_counter() - start
    text = tokenizer.decode(out)
    return {"score": string_match(text, sample.answers), "text": text, "nll": result.nll * result.n_tokens,
            "n_tokens": result.n_tokens, "memory_bytes": max(result.cache_memory_bytes, cache.memory_bytes()),
            "decoded": new - 1, "seconds": seconds, "new": new, "slots": budget, "holds": holds}


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(model, tokenizer, samples: Sequence[Sample], policies: Sequence[str], budgets: Sequence[str | int],
            chunk_size: int = 256, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (policy, budget), dense first (room for each whole prompt plus its answer); each row
    pools every sample. ``budgets``: shares such as ``"25%"`` (of each prompt) or token counts, as
    :meth:`~lucidlm.cache.spec.PolicySpec.budget` reads them. ``on_row(row)`` is called as each row is
    done; a bar on stderr counts prompts."""
    from lucidlm.cache.spec import parse_policy

    from . import progress

    runs = [("dense", None)] + [(p, b) for b in budgets for p in policies if not parse_policy(p).is_plain_dense]
    rows: list[dict] = []
    with progress(len(runs) * len(samples), "bench longctx", unit="prompt") as bar:
        for policy, budget in runs:
            bar.set_postfix_str(f"{policy}, {_label(budget)} of the prompt")
            spec, row = parse_policy(policy), _row(policy, budget)
            for sample in samples:
                new = new_tokens(tokenizer, sample)
                slots = sample.length + new if budget is None or spec.is_dense else spec.budget(budget, sample.length)
                _add(row, sample, run_one(model, tokenizer, sample, policy, slots, chunk_size))
                bar.update(1)
            _finish(row, rows[0] if rows else row)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _label(budget: str | int | None) -> str:
    return "100%" if budget is None else str(budget) if str(budget).endswith("%") else f"{budget} tok"


def _row(policy: str, budget: str | int | None) -> dict:
    return {"policy": policy, "budget": budget, "label": _label(budget), "score": 0.0, "n": 0, "by_task": {},
            "by_length": {}, "grid": {}, "cells": {}, "predictions": [], "nll": 0.0, "n_tokens": 0,
            "memory_bytes": 0, "decoded": 0, "seconds": 0.0}


def _add(row: dict, sample: Sample, one: dict) -> None:
    """Pool one prompt's result into its row: [score sum, count] per task, length, (length, depth) and
    (task, length) / (task, depth) cell; the prediction kept for ``--results``."""
    score = one["score"]
    row["score"] += score
    row["n"] += 1
    for table, key in (("by_task", sample.task), ("by_length", sample.length), ("grid", (sample.length, sample.depth)),
                       ("cells", (sample.task, "L", sample.length)), ("cells", (sample.task, "d", sample.depth))):
        counts = row[table].setdefault(key, [0.0, 0])
        counts[0] += score
        counts[1] += 1
    for key in ("nll", "n_tokens", "decoded", "seconds"):
        row[key] += one[key]
    row["memory_bytes"] = max(row["memory_bytes"], one["memory_bytes"])
    row["holds"] = one["holds"]
    row["predictions"].append((sample, one))


def _finish(row: dict, dense: dict) -> None:
    """Perplexity and its change against dense; ``worst``: the lowest (task, length) accuracy as a
    multiple of dense's, over the cells dense gets anything right in (None: no such cell)."""
    row["perplexity"] = math.exp(row["nll"] / row["n_tokens"])
    row["delta"] = row["perplexity"] / dense["perplexity"] - 1
    ratios = [_ratio(c) / _ratio(dense["cells"][k]) for k, c in row["cells"].items()
              if k[1] == "L" and _ratio(dense["cells"][k]) > 0]
    row["worst"] = min(ratios) if ratios else None


def format_table(rows: list[dict], lengths: Sequence[int], tasks: Sequence[str]) -> str:
    """A Markdown table: the header, then :func:`format_row` per row."""
    cols = ["policy", "of prompt", "accuracy", *tasks, *(f"L={n}" for n in lengths), "worst ÷ dense", "perplexity",
            "vs dense", "cache MiB", "decode tok/s"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    return "\n".join(lines + [format_row(r, lengths, tasks) for r in rows])


def format_row(r: dict, lengths: Sequence[int], tasks: Sequence[str]) -> str:
    """One row of :func:`format_table`; accuracies in percent."""
    cells = [r["policy"], r["label"], _pct(r["score"], r["n"]),
             *(_pct(*r["by_task"].get(t, (0, 0))) for t in tasks),
             *(_pct(*r["by_length"].get(n, (0, 0))) for n in lengths),
             "-" if r["worst"] is None else f"{r['worst']:.2f}",
             f"{r['perplexity']:.2f}" + HOLDS_MARK * bool(r.get("holds")), f"{r['delta']:+.1%}", f"{r['memory_bytes'] / 2 ** 20:.1f}",
             f"{r['decoded'] / r['seconds']:.1f}" if r["seconds"] > 0 else "-"]
    return "| " + " | ".join(cells) + " |"


#: marks the perplexity of a policy that reads the prompt whole and compresses after it (= dense's)
HOLDS_MARK = "†"
HOLDS_NOTE = (f"{HOLDS_MARK} compresses once after reading the prompt whole (kvpress's presses): the prompt's "
              "perplexity is dense's by construction; lucidlm bench kv streams text through it in chunks instead")


def format_detail(rows: list[dict], tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float]) -> str:
    """Accuracy per task of each row, by length and by depth: one line per (row, task).

    >>> print(format_detail([], ["passkey"], [1024], [0.0, 0.5]))
    | policy | of prompt | task | L=1024 | d=0% | d=50% |
    |---|---|---|---:|---:|---:|
    """
    cols = ["policy", "of prompt", "task", *(f"L={n}" for n in lengths), *(f"d={100 * d:g}%" for d in depths)]
    lines = ["| " + " | ".join(cols) + " |", "|---|---|---|" + "---:|" * (len(cols) - 3)]
    for r in rows:
        for t in tasks:
            cells = [*(_pct(*r["cells"].get((t, "L", n), (0, 0))) for n in lengths),
                     *(_pct(*r["cells"].get((t, "d", d), (0, 0))) for d in depths)]
            lines.append("| " + " | ".join([r["policy"], r["label"], t, *cells]) + " |")
    return "\n".join(lines)


def _pct(score: float, n: int) -> str:
    return f"{100 * score / n:.0f}%" if n else "-"


def heatmap_png(rows: Sequence[dict], lengths: Sequence[int], depths: Sequence[float]) -> bytes:
    """PNG bytes: accuracy by depth (x) and length (y); one panel per policy (columns, dense first)
    and budget (rows; dense in the first row only), each cell annotated with its percentage."""
    import numpy as np

    from lucidlm.render import png as hm

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    budgets = list(dict.fromkeys(r["label"] for r in rows if r["policy"] != "dense")) or ["100%"]
    fig = hm.new_figure(1.9 * len(policies), 1.6 * len(budgets) + 0.6)
    axes = fig.subplots(len(budgets), len(policies), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    image = None
    for r in rows:
        i = 0 if r["policy"] == "dense" else budgets.index(r["label"])
        ax = axes[i, policies.index(r["policy"])]
        acc = np.array([[_ratio(r["grid"].get((n, d))) for d in depths] for n in lengths])  # pooled over tasks
        image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (y, x), v in np.ndenumerate(acc):
            ax.text(x, y, "-" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=6)
        ax.set_axis_on()
        ax.set_xticks(range(len(depths)), [f"{100 * d:g}%" for d in depths], fontsize=6)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
        ax.set_title(f"{r['policy']} · {r['label']}", fontsize=7)
    axes[0, 0].set_xlabel("depth of the fact", fontsize=7)  # the dense panel: always drawn
    axes[0, 0].set_ylabel("prompt tokens", fontsize=7)
    # room for the titles above and the colour bar on the right
    fig.subplots_adjust(top=0.78 if len(budgets) == 1 else 0.88, right=0.88, wspace=0.4, hspace=0.5)
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.91, 0.2, 0.012, 0.55)), label="accuracy")
    fig.suptitle("long-context retrieval accuracy by KV-cache policy and budget", fontsize=9)
    return hm.figure_png(fig)


def _ratio(counts) -> float:
    return counts[0] / counts[1] if counts and counts[1] else float("nan")


# ----------------------------------------------------------------------------- the command


def parse_list(text: str, flag: str, kind: type, low: float, high: float) -> list:
    """A comma-separated list of numbers in [low, high]; :class:`CacheError` naming ``flag`` else.

    >>> parse_list("1024, 2048", "--lengths", int, 16, 8192)
    [1024, 2048]
    """
    from lucidlm.errors import CacheError

    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not low <= v <= high for v in values):
        raise CacheError(f"{flag} {text!r}: expected a comma-separated list of {kind.__name__}s in "
                         f"[{low:g}, {high:g}]")
    return values


def parse_depths(text: str) -> list[float]:
    """``--depths``: percentages of the haystack in [0, 100] (``%`` optional), as fractions in [0, 1].

    >>> parse_depths("0,25,50%,100")
    [0.0, 0.25, 0.5, 1.0]
    >>> parse_depths("0,150")
    Traceback (most recent call last):
    ...
    lucidlm.errors.CacheError: --depths '0,150': expected a comma-separated list of percentages in [0, 100] \
(0: the haystack's start, 100: just before the question)
    """
    from lucidlm.errors import CacheError

    try:
        values = [float(v.strip().removesuffix("%")) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v <= 100 for v in values):
        raise CacheError(f"--depths {text!r}: expected a comma-separated list of percentages in [0, 100] (0: the "
                         "haystack's start, 100: just before the question)")
    return [v / 100 for v in values]


def parse_budgets(text: str) -> list[str | int]:
    """``--cache-tokens``: shares of each prompt kept (``25%``: kvpress's compression ratio 0.75) or
    token counts, checked by :func:`~lucidlm.cache.spec.check_budget`.

    >>> parse_budgets("50%, 25%,128")
    ['50%', '25%', 128]
    >>> parse_budgets("0%")
    Traceback (most recent call last):
    ...
    lucidlm.errors.CacheError: --cache-tokens '0%': cache_tokens='0%': a share must be in (0%, 100%]
    """
    from lucidlm.cache.spec import check_budget
    from lucidlm.errors import CacheError

    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise CacheError(f"--cache-tokens {text!r}: expected shares such as 50%,25% or token counts")
    try:
        return [check_budget(v) for v in items]
    except CacheError as exc:
        raise CacheError(f"--cache-tokens {text!r}: {exc}") from None


def _options(args) -> tuple[list[str], list[int], list[float], list[str | int], list[str]]:
    """(tasks, lengths, depths, budgets, policies) from the command line, checked before loading."""
    from lucidlm.cache.spec import check_policy, split_policies
    from lucidlm.errors import CacheError

    from ..ruler import check_tasks

    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    if args.trials < 1:
        raise CacheError(f"--trials {args.trials}: expected an integer >= 1")
    policies = [check_policy(p) for p in split_policies(args.policies)]
    return (tasks, parse_list(args.lengths, "--lengths", int, 16, 1 << 20), parse_depths(args.depths),
            parse_budgets(args.cache_tokens), policies)


def _check_outputs(args) -> None:
    """Before the long run, not after it: the heatmap's directory exists, ``--results`` is no file."""
    from lucidlm.errors import CacheError
    from lucidlm.fileio import check_target

    if args.heatmap is not None:
        check_target(args.heatmap)
    if args.results is not None and args.results.exists() and not args.results.is_dir():
        raise CacheError(f"--results {args.results}: exists and is not a directory")


def run(args) -> int:
    """The bench; bad options raise typed errors (the CLI's exit 2) before torch is imported."""
    tasks, lengths, depths, budgets, policies = _options(args)
    _check_outputs(args)
    from lucidlm import LLM
    from lucidlm.errors import CacheError
    from lucidlm.fileio import atomic_write

    from . import emit
    from .kv import load_text
    from ..ruler import Haystack

    llm = LLM.load(args.model, dtype=args.dtype, device=args.device, progress=True)
    if max(lengths) + 64 > llm.config.block_size:
        raise CacheError(f"--lengths {max(lengths)} plus the answer exceed the context length "
                         f"{llm.config.block_size} of {llm.source}")
    hay = Haystack(llm.tokenizer, load_text(args.text))
    samples = make_samples(llm.tokenizer, hay, tasks, lengths, depths, args.trials, args.seed)
    emit(f"{llm.source}: {len(samples)} prompts per row ({', '.join(tasks)} x {len(lengths)} lengths x "
         f"{len(depths)} depths x {args.trials} trial(s), seed {args.seed}), chunk {args.chunk_size}, "
         f"{args.device} {args.dtype}; accuracy = RULER's string match (lucidlm.ruler.string_match)")
    for line in format_table([], lengths, tasks).splitlines():  # the header now, each row as measured
        emit(line)

    def done(row: dict) -> None:
        emit(format_row(row, lengths, tasks))
        if args.results is not None:
            write_row(args.results, row, llm, args)

    rows = measure(llm.model, llm.tokenizer, samples, policies, budgets, args.chunk_size, on_row=done)
    if any(r.get("holds") for r in rows):
        emit(HOLDS_NOTE)
    emit()
    for line in format_detail(rows, tasks, lengths, depths).splitlines():
        emit(line)
    if args.heatmap is not None:
        atomic_write(args.heatmap, heatmap_png(rows, lengths, depths))
        emit(f"heatmap: {args.heatmap}")
    if args.results is not None:
        emit(f"results: {args.results} (kvpress's evaluation format: predictions.csv, metrics.json, config.yaml)")
    return 0


def write_row(root, row: dict, llm, args) -> list:
    """A row's kvpress results folders, one per prompt length (kvpress's ``data_dir``); their paths."""
    from .kvpress_results import write_results

    model = llm.hub_id or llm.name
    by_length: dict[int, list] = {}
    for sample, one in row["predictions"]:
        by_length.setdefault(sample.length, []).append((sample, one))
    folders = []
    for length, pairs in sorted(by_length.items()):
        # kvpress's compression_ratio: the share removed (dense: 0, as its no_press)
        ratio = 0.0 if row["budget"] is None else 1 - pairs[0][1]["slots"] / length
        records = [{"question": llm.tokenizer.decode(s.question), "answer": list(s.answers), "task": s.task,
                    "max_new_tokens": one["new"], "predicted_answer": one["text"], "length": s.length,
                    "depth": s.depth, "trial": s.trial, "question_tokens": s.question_tokens} for s, one in pairs]
        extra = {"cache_tokens": row["budget"], "slots": pairs[0][1]["slots"], "device": args.device,
                 "dtype": args.dtype, "chunk_size": args.chunk_size, "trials": args.trials,
                 "haystack": [str(p) for p in args.text] if args.text else "/usr/share/common-licenses",
                 "generator": "lucidlm.ruler (RULER-style, offline)"}
        folders.append(write_results(root, model=model, policy=row["policy"], compression_ratio=ratio,
                                     data_dir=str(length), rows=records, seed=args.seed, extra=extra))
    return folders

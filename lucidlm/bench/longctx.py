"""``lucidlm bench longctx``: can the model still find a fact in a long prompt under each KV-cache policy?

Long-context retrieval with nothing to download: the haystack is the license texts every Debian
machine has in ``/usr/share/common-licenses`` (a random window of them per prompt), and two tasks are
generated from a seeded generator:

* ``passkey``: "The pass key is 71432. Remember it. 71432 is the pass key." hidden at depth ``d``;
  the prompt ends "What is the pass key? The pass key is", the answer is the number.
* ``needle``: "The best thing to do in Lisbon is eat a sandwich in Dolores Park." hidden the same
  way; the prompt ends "What is the best thing to do in Lisbon? The best thing to do in Lisbon is".

Depth 0 puts the fact right after the prompt's opening line, depth 1 right before the question.
Every prompt is exactly ``length`` tokens, streamed through the policy in chunks (evicting between
chunks) with a cache of 12.5%, 25% and 50% of its length (dense once, with room for it all); the
same prompts go through every policy, so rows compare like with like.

Per row (a policy at a budget, over all lengths, depths, trials and tasks): accuracy (greedy
continuation, :func:`is_correct`), per task and per length; perplexity of the prompts (mostly
haystack) through the same cache, and its change against dense; the cache's peak MiB (at the
longest length); decode tokens/s of the answer tokens. ``--heatmap`` draws accuracy by depth (x)
and length (y), one panel per policy and budget.

>>> is_correct(" 71432.\\nThe", "71432"), is_correct(" 714321", "71432")
(True, False)
>>> print(format_table([], lengths=[1024], tasks=["passkey"]))
| policy | of prompt | accuracy | passkey | L=1024 | perplexity | vs dense | cache MiB | decode tok/s |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from collections.abc import Callable, Sequence

from .args import add_longctx as add_arguments  # noqa: F401  (lucidlm bench longctx's options)

TASKS = ("passkey", "needle")
_INTRO = {
    "passkey": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.\n\n",
    "needle": "There is an important fact hidden inside a lot of irrelevant text. Find it and memorize it. "
              "I will quiz you about it.\n\n",
}
_CITIES = ("San Francisco", "Lisbon", "Nairobi", "Osaka", "Montreal", "Krakow", "Valparaiso", "Tbilisi",
           "Hanoi", "Reykjavik", "Marseille", "Cork")
_ACTIVITIES = ("eat a sandwich in Dolores Park", "ride the old yellow tram", "swim at the northern beach",
               "climb the castle hill at dawn", "visit the glass museum", "drink tea in the botanical garden",
               "walk along the harbour wall", "buy bread at the night market", "watch the boats from the pier",
               "read in the public library", "cycle around the lake", "listen to jazz in the cellar bars")
#: the needle snaps to a word boundary at most this many tokens from the requested depth
SNAP = 8


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt: token ids (exactly ``length`` of them), the expected answer, and where the fact is.

    ``needle_start``: index in ``ids`` of the fact's first token; ``needle_len``: its token count.
    """

    task: str
    length: int
    depth: float
    trial: int
    ids: list[int]
    answer: str
    needle_start: int
    needle_len: int


def _fact(task: str, rng: random.Random) -> tuple[str, str, str]:
    """(the hidden sentence, the question ending where the answer starts, the answer)."""
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        return (f"The pass key is {key}. Remember it. {key} is the pass key.",
                "What is the pass key? The pass key is", key)
    city, activity = rng.choice(_CITIES), rng.choice(_ACTIVITIES)
    return (f"The best thing to do in {city} is {activity}.",
            f"What is the best thing to do in {city}? The best thing to do in {city} is", activity)


def make_sample(tokenizer, corpus: Sequence[int], task: str, length: int, depth: float, rng: random.Random,
                trial: int = 0) -> Sample:
    """A prompt of exactly ``length`` tokens: the task's opening line, a random window of ``corpus``
    (token ids of the haystack text) with the fact inserted at ``depth`` of it, then the question.

    >>> class Chars:  # a toy tokenizer: one token per character
    ...     def encode(self, text, add_special_tokens=True): return [ord(c) for c in text]
    ...     def decode(self, ids): return "".join(map(chr, ids))
    >>> corpus = Chars().encode("lorem ipsum dolor sit amet " * 100)
    >>> s = make_sample(Chars(), corpus, "passkey", 600, 0.5, random.Random(0))
    >>> len(s.ids), Chars().decode(s.ids[s.needle_start:s.needle_start + 17])
    (600, '\\n\\nThe pass key is')
    """
    from lucidlm.errors import CacheError

    sentence, question, answer = _fact(task, rng)
    intro = tokenizer.encode(_INTRO[task])  # the checkpoint's own BOS handling
    needle = tokenizer.encode(f"\n\n{sentence}\n\n", add_special_tokens=False)
    ask = tokenizer.encode(f"\n\n{question}", add_special_tokens=False)
    n = length - len(intro) - len(needle) - len(ask)
    if n < 1 or n >= len(corpus):
        raise CacheError(f"--lengths {length}: a {task} prompt needs more than {length - n} tokens and the "
                         f"haystack has {len(corpus)}: choose lengths in ({length - n}, {len(corpus)})")
    start = rng.randrange(len(corpus) - n + 1)
    hay = list(corpus[start:start + n])
    cut = _snap(tokenizer, hay, round(depth * n))
    ids = intro + hay[:cut] + needle + hay[cut:] + ask
    return Sample(task, length, depth, trial, ids, answer, len(intro) + cut, len(needle))


def _snap(tokenizer, hay: list[int], cut: int) -> int:
    """The nearest index to ``cut`` where a word starts (the fact never splits a word in two)."""
    for offset in sorted(range(-SNAP, SNAP + 1), key=abs):
        i = cut + offset
        if i in (0, len(hay)) or (0 < i < len(hay) and tokenizer.decode([hay[i]])[:1].isspace()):
            return i
    return cut


def make_samples(tokenizer, corpus: Sequence[int], tasks: Sequence[str], lengths: Sequence[int],
                 depths: Sequence[float], trials: int = 1, seed: int = 0) -> list[Sample]:
    """Every (length, depth, trial, task) prompt, from one generator seeded with ``seed``."""
    rng = random.Random(seed)
    return [make_sample(tokenizer, corpus, task, length, depth, rng, trial)
            for length in lengths for depth in depths for trial in range(trials) for task in tasks]


def normalize(text: str) -> str:
    """Lower case, letters and digits only, single spaces: ``" 71432.\\n"`` -> ``"71432"``."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def is_correct(generated: str, answer: str) -> bool:
    """Exact match at the start: the normalised continuation is the normalised answer, or begins
    with it followed by a new word (so "71432. Remember" counts, "714321" and "7143" do not).

    >>> is_correct(" eat a sandwich in Dolores Park. It", "eat a sandwich in Dolores Park")
    True
    >>> is_correct(" eat a sandwich", "eat a sandwich in Dolores Park")
    False
    """
    got, want = normalize(generated), normalize(answer)
    return bool(want) and (got == want or got.startswith(want + " "))


def run_one(model, tokenizer, sample: Sample, policy: str, budget: int, chunk_size: int = 256) -> dict:
    """Stream ``sample`` through a fresh ``policy`` cache of ``budget`` slots (scoring it: perplexity),
    then decode the answer greedily on that cache."""
    import torch

    from lucidlm.cache import build_cache
    from lucidlm.perplexity import score

    param = next(model.parameters())
    new = len(tokenizer.encode(" " + sample.answer, add_special_tokens=False)) + 2  # room for the full stop
    cache = build_cache(model.config, 1, policy, budget, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        result, last = score(model, torch.tensor([sample.ids], device=param.device), cache, chunk_size)
        token, out = last.argmax(-1, keepdim=True), []
        start = time.perf_counter()
        for _ in range(new):
            out.append(int(token))
            if len(out) < new:  # the last token needs no forward
                token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        _sync(param.device)
        seconds = time.perf_counter() - start
    text = tokenizer.decode(out)
    return {"correct": is_correct(text, sample.answer), "text": text, "nll": result.nll * result.n_tokens,
            "n_tokens": result.n_tokens, "memory_bytes": max(result.cache_memory_bytes, cache.memory_bytes()),
            "decoded": new - 1, "seconds": seconds}


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(model, tokenizer, samples: Sequence[Sample], policies: Sequence[str], fractions: Sequence[float],
            chunk_size: int = 256, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (policy, budget), dense first (room for each whole prompt plus its answer); each row
    pools every sample. ``on_row(row)`` is called as each row is done; a bar on stderr counts prompts."""
    from . import progress

    runs = [("dense", 1.0)] + [(p, f) for f in fractions for p in policies if p != "dense"]
    rows: list[dict] = []
    with progress(len(runs) * len(samples), "bench longctx", unit="prompt") as bar:
        for policy, fraction in runs:
            bar.set_postfix_str(f"{policy}, {fraction:g} of the prompt")
            row = _row(policy, fraction)
            for sample in samples:
                budget = sample.length + 64 if policy == "dense" else max(1, round(fraction * sample.length))
                _add(row, sample, run_one(model, tokenizer, sample, policy, budget, chunk_size))
                bar.update(1)
            row["perplexity"] = math.exp(row["nll"] / row["n_tokens"])
            row["delta"] = row["perplexity"] / (rows[0] if rows else row)["perplexity"] - 1  # vs dense
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _row(policy: str, fraction: float) -> dict:
    return {"policy": policy, "fraction": fraction, "correct": 0, "n": 0, "by_task": {}, "by_length": {},
            "grid": {}, "nll": 0.0, "n_tokens": 0, "memory_bytes": 0, "decoded": 0, "seconds": 0.0}


def _add(row: dict, sample: Sample, one: dict) -> None:
    """Pool one prompt's result into its row: counts [correct, total] per task, length and cell."""
    hit = int(one["correct"])
    row["correct"] += hit
    row["n"] += 1
    for table, key in (("by_task", sample.task), ("by_length", sample.length),
                       ("grid", (sample.length, sample.depth))):
        counts = row[table].setdefault(key, [0, 0])
        counts[0] += hit
        counts[1] += 1
    for key in ("nll", "n_tokens", "decoded", "seconds"):
        row[key] += one[key]
    row["memory_bytes"] = max(row["memory_bytes"], one["memory_bytes"])


def format_table(rows: list[dict], lengths: Sequence[int], tasks: Sequence[str]) -> str:
    """A Markdown table: the header, then :func:`format_row` per row."""
    cols = ["policy", "of prompt", "accuracy", *tasks, *(f"L={n}" for n in lengths), "perplexity", "vs dense",
            "cache MiB", "decode tok/s"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    return "\n".join(lines + [format_row(r, lengths, tasks) for r in rows])


def format_row(r: dict, lengths: Sequence[int], tasks: Sequence[str]) -> str:
    """One row of :func:`format_table`; accuracies in percent."""
    cells = [r["policy"], f"{100 * r['fraction']:g}%", _pct(r["correct"], r["n"]),
             *(_pct(*r["by_task"].get(t, (0, 0))) for t in tasks),
             *(_pct(*r["by_length"].get(n, (0, 0))) for n in lengths),
             f"{r['perplexity']:.2f}", f"{r['delta']:+.1%}", f"{r['memory_bytes'] / 2 ** 20:.1f}",
             f"{r['decoded'] / r['seconds']:.1f}" if r["seconds"] > 0 else "-"]
    return "| " + " | ".join(cells) + " |"


def _pct(correct: int, n: int) -> str:
    return f"{100 * correct / n:.0f}%" if n else "-"


def heatmap_png(rows: Sequence[dict], lengths: Sequence[int], depths: Sequence[float]) -> bytes:
    """PNG bytes: accuracy by depth (x) and length (y); one panel per policy (columns, dense first)
    and budget (rows; dense in the first row only), each cell annotated with its percentage."""
    import numpy as np

    from lucidlm.render import png as hm

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows if r["policy"] != "dense"}) or [1.0]
    fig = hm.new_figure(1.9 * len(policies), 1.6 * len(fractions) + 0.6)
    axes = fig.subplots(len(fractions), len(policies), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    image = None
    for r in rows:
        i = 0 if r["policy"] == "dense" else fractions.index(r["fraction"])
        ax = axes[i, policies.index(r["policy"])]
        acc = np.array([[_ratio(r["grid"].get((n, d))) for d in depths] for n in lengths])
        image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (y, x), v in np.ndenumerate(acc):
            ax.text(x, y, "-" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=6)
        ax.set_axis_on()
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
        ax.set_title(f"{r['policy']} · {100 * r['fraction']:g}%", fontsize=7)
    axes[0, 0].set_xlabel("depth of the fact", fontsize=7)  # the dense panel: always drawn
    axes[0, 0].set_ylabel("prompt tokens", fontsize=7)
    # room for the titles above and the colour bar on the right
    fig.subplots_adjust(top=0.78 if len(fractions) == 1 else 0.88, right=0.88, wspace=0.4, hspace=0.5)
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.91, 0.2, 0.012, 0.55)), label="accuracy")
    fig.suptitle("long-context retrieval accuracy by KV-cache policy and budget", fontsize=9)
    return hm.figure_png(fig)


def _ratio(counts) -> float:
    return counts[0] / counts[1] if counts and counts[1] else float("nan")


# ----------------------------------------------------------------------------- the command


def parse_list(text: str, flag: str, kind: type, low: float, high: float) -> list:
    """A comma-separated list of numbers in [low, high]; :class:`CacheError` naming ``flag`` else.

    >>> parse_list("0, 0.5,1", "--depths", float, 0, 1)
    [0.0, 0.5, 1.0]
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


def _options(args) -> tuple[list[str], list[int], list[float], list[float], list[str]]:
    """(tasks, lengths, depths, fractions, policies) from the command line, checked before loading."""
    from lucidlm.cache.spec import check_policy, split_policies
    from lucidlm.errors import CacheError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in TASKS for t in tasks):
        raise CacheError(f"--tasks {args.tasks!r}: expected a comma-separated list from {', '.join(TASKS)}")
    if args.trials < 1:
        raise CacheError(f"--trials {args.trials}: expected an integer >= 1")
    policies = [check_policy(p) for p in split_policies(args.policies)]
    return (tasks, parse_list(args.lengths, "--lengths", int, 16, 1 << 20),
            parse_list(args.depths, "--depths", float, 0, 1),
            parse_list(args.fractions, "--fractions", float, 1e-9, 1), policies)


def run(args) -> int:
    from lucidlm import LLM
    from lucidlm.errors import CacheError, LucidError
    from lucidlm.fileio import atomic_write, check_target

    from . import emit
    from .kv import load_text

    try:
        tasks, lengths, depths, fractions, policies = _options(args)
        if args.heatmap is not None:
            check_target(args.heatmap)  # before the long run, not after it
        llm = LLM.load(args.model, dtype=args.dtype, device=args.device, progress=True)
        if max(lengths) + 64 > llm.config.block_size:
            raise CacheError(f"--lengths {max(lengths)} plus the answer exceed the context length "
                             f"{llm.config.block_size} of {llm.source}")
        corpus = llm.tokenizer.encode(load_text(), add_special_tokens=False)
        samples = make_samples(llm.tokenizer, corpus, tasks, lengths, depths, args.trials, args.seed)
    except (LucidError, OSError) as exc:
        print(f"lucidlm bench longctx: {exc}")
        return 1
    emit(f"{llm.source}: {len(samples)} prompts per row ({', '.join(tasks)} x {len(lengths)} lengths x "
         f"{len(depths)} depths x {args.trials} trial(s), seed {args.seed}), chunk {args.chunk_size}, "
         f"{args.device} {args.dtype}; correct = the greedy answer matches exactly (lucidlm.bench.longctx.is_correct)")
    for line in format_table([], lengths, tasks).splitlines():  # the header now, each row as measured
        emit(line)
    rows = measure(llm.model, llm.tokenizer, samples, policies, fractions, args.chunk_size,
                   on_row=lambda row: emit(format_row(row, lengths, tasks)))
    if args.heatmap is not None:
        atomic_write(args.heatmap, heatmap_png(rows, lengths, depths))
        emit(f"heatmap: {args.heatmap}")
    return 0

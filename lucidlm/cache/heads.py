"""Retrieval-head calibration for ``duo``: which KV heads look back at a needle, written to a file.

DuoAttention (Xiao et al. 2025, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads") splits the KV heads into retrieval heads, which need the full context, and
streaming heads, for which attention sinks plus a recent window suffice. It finds them by
optimising a gate per head on synthetic passkey-retrieval data. Here each KV head is scored, as
Wu et al. 2024 ("Retrieval Head Mechanistically Explains Long-Context Factuality") score retrieval
heads, by the attention it pays to the needle when the answer is produced: on synthetic passkey
prompts built offline from local text (a pass key hidden at depths 0-100% of a haystack, then the
question and the answer, teacher-forced), a head's score is the attention weight that the queries
predicting the answer put on the needle's tokens, averaged over the group's query heads, those
queries and the prompts. No gradient and no optimisation: one forward per prompt.

The file (JSON, written atomically) names the model — ``name``, ``n_layer``, ``groups`` (KV heads
per layer) and a hash of its config — and holds one score per layer and KV head; reading it for
another model is a :class:`~lucidlm.errors.CacheError` naming the file and both models.

>>> import tempfile, pathlib
>>> from lucidlm import Config
>>> config = Config.from_name("tiny-llama")
>>> path = pathlib.Path(tempfile.mkdtemp()) / "heads.json"
>>> _ = write_head_scores(path, HeadScores(model_identity(config), [[0.5, 0.1], [0.2, 0.3]]))
>>> read_head_scores(path, config).scores
[[0.5, 0.1], [0.2, 0.3]]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CacheError, DataError
from ..fileio import atomic_write, read_json
from .base import KVCache, LayerCache
from .presses import attention_weights

#: the ``format`` field of a head-score file
FORMAT = "lucidlm-head-scores/1"
#: where the haystack comes from when no text file is given (present on Debian/Ubuntu systems)
DEFAULT_TEXTS = Path("/usr/share/common-licenses")


def model_identity(config) -> dict:
    """What a head file must match: the model's name, layers, KV groups and a hash of its config.

    >>> from lucidlm import Config
    >>> sorted(model_identity(Config.from_name("tiny-llama")))
    ['config_hash', 'groups', 'n_layer', 'name']
    """
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return {"name": config.name, "n_layer": config.n_layer, "groups": config.kv_slot_sizes()[0],
            "config_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


@dataclasses.dataclass
class HeadScores:
    """Per layer and KV head, how much the head retrieves (higher: keep its full cache)."""

    model: dict
    scores: list[list[float]]
    method: str = "needle attention (Wu et al. 2024)"
    samples: int = 0
    length: int = 0


def write_head_scores(path: str | Path, heads: HeadScores) -> Path:
    """Write ``heads`` to ``path`` as JSON, atomically."""
    return atomic_write(path, json.dumps({"format": FORMAT, **dataclasses.asdict(heads)}, indent=1) + "\n")


def read_head_scores(path: str | Path, config) -> HeadScores:
    """The head scores in ``path`` for the model of ``config``; :class:`CacheError` when the file is
    missing, not valid JSON, not a head file, or for another model (naming both)."""
    data = read_json(path, CacheError, "a head-score file from lucidlm calibrate-heads")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{path}: not a head-score file (expected format {FORMAT!r}, from lucidlm calibrate-heads)")
    fields = {f.name for f in dataclasses.fields(HeadScores)}
    try:
        heads = HeadScores(**{k: v for k, v in data.items() if k in fields})
    except TypeError as exc:
        raise CacheError(f"{path}: malformed head-score file ({exc})") from None
    want = model_identity(config)
    if heads.model != want:
        raise CacheError(f"{path}: head scores of model {_describe(heads.model)}, not of this model "
                         f"{_describe(want)}; calibrate it: lucidlm calibrate-heads MODEL --out FILE")
    shape_ok = len(heads.scores) == want["n_layer"] and all(
        isinstance(row, list) and len(row) == want["groups"] and all(isinstance(x, (int, float)) for x in row)
        for row in heads.scores)
    if not shape_ok:
        raise CacheError(f"{path}: malformed head-score file: expected {want['n_layer']} layers of "
                         f"{want['groups']} numbers in 'scores'")
    return heads


def _describe(model) -> str:
    if not isinstance(model, dict):
        return repr(model)
    return (f"{model.get('name')!r} ({model.get('n_layer')} layers, {model.get('groups')} KV heads, "
            f"config {model.get('config_hash')})")


# ---- calibration -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
    """A passkey prompt: token ids, the needle's token span, and the queries that predict the answer."""

    ids: list[int]
    needle: tuple[int, int]
    answer_queries: tuple[int, int]


def haystack_text(texts: Sequence[str | Path] = ()) -> str:
    """The text of ``texts`` (files, or the files of directories), else of :data:`DEFAULT_TEXTS`."""
    paths = [Path(t) for t in texts] or [DEFAULT_TEXTS]
    files = sorted(f for p in paths for f in ([p] if p.is_file() else sorted(p.glob("*")) if p.is_dir() else [])
                   if f.is_file())
    if not files:
        raise DataError(f"no text files in {', '.join(map(str, paths))}: give --texts FILE_OR_DIR")
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def needle_prompts(tokenizer, text: str, samples: int = 8, length: int = 1024, seed: int = 0) -> list[NeedlePrompt]:
    """``samples`` passkey prompts of ``length`` tokens, the needle at depths spread over 0-100%,
    deterministic for ``seed``."""
    hay = tokenizer.encode(text, add_special_tokens=False)
    start = tokenizer.encode("", add_special_tokens=True)
    question = tokenizer.encode(" What is the pass key? The pass key is", add_special_tokens=False)
    prompts = []
    for s in range(samples):
        rng = random.Random(seed * 1_000_003 + s)
        key = rng.randint(10000, 99999)
        needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key.",
                                  add_special_tokens=False)
        answer = tokenizer.encode(f" {key}", add_special_tokens=False)
        room = length - len(start) - len(needle) - len(question) - len(answer)
        if room < 1 or not hay:
            raise DataError(f"length={length} tokens leaves no room for the haystack (at least "
                            f"{length - room + 1} needed) or the text is empty")
        offset = rng.randrange(len(hay))
        filler = (hay * (room // len(hay) + 2))[offset:offset + room]
        cut = round(room * (s / (samples - 1) if samples > 1 else 0.5))
        ids = start + filler[:cut] + needle + filler[cut:] + question + answer
        at = len(start) + cut
        prompts.append(NeedlePrompt(ids, (at, at + len(needle)), (len(ids) - len(answer) - 1, len(ids) - 1)))
    return prompts


def calibrate_heads(model, tokenizer, texts: Sequence[str | Path] = (), samples: int = 8, length: int = 1024,
                    seed: int = 0) -> HeadScores:
    """Score every KV head of ``model`` (a GPT or an LLM) by the attention its answer queries pay to
    the needle (see the module doc)."""
    gpt = getattr(model, "model", model)
    prompts = needle_prompts(tokenizer, haystack_text(texts), samples, length, seed)
    total = None
    device = next(gpt.parameters()).device
    with torch.no_grad():
        for prompt in prompts:
            layers = [NeedleAttention(prompt, block.attn) for block in gpt.layers]
            gpt(torch.tensor([prompt.ids], device=device), cache=KVCache(layers), last_only=True)
            mass = torch.stack([layer.mass for layer in layers])  # (layers, groups)
            total = mass if total is None else total + mass
    scores = (total / len(prompts)).tolist()
    return HeadScores(model_identity(gpt.config), scores, samples=samples, length=length)


class NeedleAttention(LayerCache):
    """A layer "cache" for one forward over ``prompt``: stores nothing, and records per KV group the
    attention mass the answer queries put on the needle (``mass``, (groups,))."""

    wants_queries = True

    def __init__(self, prompt: NeedlePrompt, attention) -> None:
        self.prompt, self.attention = prompt, attention
        self.keys: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None

    def extend(self, k, v, pos):
        self.keys = k
        return k, v, pos

    def see_queries(self, q, pos):
        first, last = self.prompt.answer_queries
        weights = attention_weights(q[:, :, first:last], pos[:, first:last], self.keys, pos,
                                    self.attention.scale, self.attention.softcap)
        start, end = self.prompt.needle
        self.mass = weights[0, ..., start:end].sum(-1).mean(dim=(1, 2))  # (groups,)

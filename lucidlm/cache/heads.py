"""Retrieval-head scores for ``duo``: which KV heads look back at a needle, as a file.

DuoAttention (Xiao et al. 2025, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads") splits the KV heads into retrieval heads, which need the full context, and
streaming heads, for which attention sinks plus a recent window suffice. :mod:`lucidlm.calibrate`
scores every KV head (``lucidlm calibrate-heads``); this module is the file those scores live in,
which the ``duo`` policy reads.

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
from pathlib import Path

from ..errors import CacheError
from ..fileio import atomic_write, read_json

#: the ``format`` field of a head-score file
FORMAT = "lucidlm-head-scores/1"


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

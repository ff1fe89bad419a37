"""Results folders in NVIDIA kvpress's evaluation format, so lucidlm's runs line up with kvpress's.

kvpress (https://github.com/NVIDIA/kvpress, ``evaluation/evaluate.py``) writes one folder per run,
named ``{dataset}__{data_dir}__{model with / as --}__{press_name}__{compression_ratio:.2f}`` (plus
``__query_aware`` when the question was compressed with the context), holding:

* ``predictions.csv``: one row per sample, the dataset's columns but the context (``question``,
  ``answer_prefix``, ``answer`` — the list of expected strings, as pandas writes a list —, ``task``,
  ``max_new_tokens``), the model's ``predicted_answer`` and the run's ``compression_ratio``;
* ``metrics.json``: for RULER ``{task: {"string_match": percent}}``
  (:func:`lucidlm.ruler.task_scores`);
* ``config.yaml``: the run's configuration (``dataset``, ``data_dir``, ``model``, ``press_name``,
  ``compression_ratio``, ``query_aware``, ``seed``, ...).

kvpress's ``compression_ratio`` is the share of the cache *removed*: lucidlm's ``--cache-tokens 25%``
(a quarter kept) is ``compression_ratio: 0.75``. lucidlm's RULER data_dir is the prompt length, as
kvpress's (``ruler/4096``); every lucidlm run is query-aware in kvpress's sense (the prompt ends with
the question and goes through the policy whole). lucidlm adds columns (``length``, ``depth``,
``trial``, ``question_tokens``, ``score``) and a ``lucidlm`` entry in the config. The folder of a
rerun goes under the first as ``1``, ``2``, ... as kvpress does; each folder is written atomically.

>>> import tempfile
>>> rows = [dict(question="What is the pass key?", answer=["71432"], task="passkey", max_new_tokens=6,
...              predicted_answer=" 71432.", length=1024, depth=0.5, trial=0, question_tokens=12)]
>>> folder = write_results(tempfile.mkdtemp(), model="HuggingFaceTB/SmolLM2-135M-Instruct",
...                        policy="snapkv(heads=adaptive)", compression_ratio=0.75, data_dir="1024", rows=rows)
>>> folder.name
'ruler__1024__HuggingFaceTB--SmolLM2-135M-Instruct__snapkv-heads=adaptive__0.75__query_aware'
>>> back = read_results(folder)
>>> back["metrics"], back["predictions"][0]["answer"], back["config"]["press_name"]
({'passkey': {'string_match': 100.0}}, ['71432'], 'snapkv(heads=adaptive)')
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..ruler import string_match, task_scores

#: predictions.csv: kvpress's columns (the context left out, as kvpress leaves it out), then lucidlm's
COLUMNS = ("question", "answer_prefix", "answer", "task", "max_new_tokens", "predicted_answer", "compression_ratio",
           "length", "depth", "trial", "question_tokens", "score")
#: lucidlm policy -> the kvpress press (evaluate_registry.PRESS_REGISTRY) that does the same, where one does
KVPRESS_PRESSES = {
    "dense": "no_press", "sink": "streaming_llm", "snapkv": "snapkv", "pyramidkv": "pyramidkv", "tova": "tova",
    "knorm": "knorm", "h2o": "observed_attention", "expected-attention": "expected_attention", "kvzip": "kvzip",
    "duo": "duo_attention", "snapkv-q": "snapkv", "snapkv(heads=adaptive)": "adakv_snapkv",
}


def folder_name(dataset: str, data_dir: str, model: str, press_name: str, compression_ratio: float,
                query_aware: bool = True) -> str:
    """kvpress's ``EvaluationConfig.get_results_dir`` name; the press name made safe for a path
    (anything but letters, digits, ``.=+_-`` becomes ``-``, trailing ``-`` dropped).

    >>> folder_name("ruler", "4096", "Qwen/Qwen3-8B", "snapkv", 0.5, query_aware=False)
    'ruler__4096__Qwen--Qwen3-8B__snapkv__0.50'
    """
    press = re.sub(r"[^\w.=+-]+", "-", press_name).strip("-")
    parts = [dataset, data_dir, model.replace("/", "--"), press, f"{compression_ratio:.2f}"]
    return "__".join(p for p in parts if p) + ("__query_aware" if query_aware else "")


def config_yaml(config: dict) -> str:
    """``config`` as YAML, one key a line: every value written as JSON, which YAML reads as the same
    value (no YAML library needed).

    >>> print(config_yaml({"dataset": "ruler", "query_aware": True, "threshold": None, "x": {"a": [1]}}), end="")
    dataset: "ruler"
    query_aware: true
    threshold: null
    x: {"a": [1]}
    """
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())


def _config(model: str, policy: str, compression_ratio: float, data_dir: str, seed: int, extra: dict) -> dict:
    """kvpress's EvaluationConfig fields in its order, then lucidlm's own under ``lucidlm``."""
    return {"dataset": "ruler", "data_dir": data_dir, "model": model, "device": extra.get("device"),
            "press_name": policy, "compression_ratio": compression_ratio, "key_channel_compression_ratio": None,
            "fraction": 1.0, "max_new_tokens": None, "max_context_length": None, "query_aware": True,
            "needle_depth": None, "output_dir": extra.get("output_dir"), "log_level": "INFO", "model_kwargs": {},
            "press_init_command": KVPRESS_PRESSES.get(policy), "seed": seed, "fp8": False,
            "lucidlm": {"policy": policy, **{k: v for k, v in extra.items() if k not in ("device", "output_dir")}}}


def predictions_csv(rows: Sequence[dict], compression_ratio: float) -> str:
    """The CSV text: :data:`COLUMNS`; ``answer`` as a Python list literal (what pandas writes for a
    list), ``score`` the sample's string match."""
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"answer_prefix": "", **row, "answer": repr(list(row["answer"])),
                         "compression_ratio": compression_ratio,
                         "score": string_match(row["predicted_answer"], row["answer"])})
    return out.getvalue()


def write_results(root: str | Path, *, model: str, policy: str, compression_ratio: float, data_dir: str,
                  rows: Sequence[dict], seed: int = 0, extra: dict | None = None) -> Path:
    """One run's folder under ``root`` (predictions.csv, metrics.json, config.yaml); its path.

    ``rows``: one dict per sample with ``question``, ``answer`` (list of strings), ``task``,
    ``max_new_tokens``, ``predicted_answer`` and lucidlm's ``length``, ``depth``, ``trial``,
    ``question_tokens``."""
    from lucidlm.fileio import atomic_dir

    folder = Path(root).expanduser() / folder_name("ruler", data_dir, model, policy, compression_ratio)
    if folder.is_dir() and any(folder.iterdir()):  # kvpress: a rerun goes under the first run, numbered
        i = 1
        while (folder / str(i)).exists():
            i += 1
        folder = folder / str(i)
    metrics = task_scores([r["predicted_answer"] for r in rows], [r["answer"] for r in rows], [r["task"] for r in rows])
    config = _config(model, policy, compression_ratio, data_dir, seed, dict(extra or {}, output_dir=str(root)))
    with atomic_dir(folder) as tmp:
        (tmp / "predictions.csv").write_text(predictions_csv(rows, compression_ratio), encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=4), encoding="utf-8")
        (tmp / "config.yaml").write_text(config_yaml(config), encoding="utf-8")
    return folder


def read_results(folder: str | Path) -> dict:
    """A folder written by :func:`write_results` (or kvpress): ``{"config", "metrics", "predictions"}``
    with ``answer`` back as a list (read with :func:`ast.literal_eval`, never ``eval``) and the numbers
    of lucidlm's columns as numbers. A missing file or a malformed line raises :class:`~lucidlm.errors.CacheError`."""
    from lucidlm.errors import CacheError

    folder = Path(folder)
    try:
        config = {k: json.loads(v) for k, _, v in (line.partition(": ") for line in
                  (folder / "config.yaml").read_text(encoding="utf-8").splitlines() if line.strip())}
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        with open(folder / "predictions.csv", encoding="utf-8", newline="") as f:
            predictions = [_typed(row) for row in csv.DictReader(f)]
    except (OSError, ValueError, SyntaxError) as exc:
        raise CacheError(f"{folder}: not a results folder of lucidlm bench longctx ({exc})") from exc
    return {"config": config, "metrics": metrics, "predictions": predictions}


def _typed(row: dict) -> dict:
    row["answer"] = ast.literal_eval(row["answer"])
    for key, kind in (("max_new_tokens", int), ("compression_ratio", float), ("length", int), ("depth", float),
                      ("trial", int), ("question_tokens", int), ("score", float)):
        if row.get(key) not in (None, ""):
            row[key] = kind(row[key])
    return row

"""The files of an ``explain-dataset`` directory: shards written atomically (JSONL or Parquet),
and :func:`read_results`, which reads a finished run's rows back in record order (see
:mod:`lucidlm.explain.dataset`, which writes them). Torch-free at import.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExplainError

RUN_FILE, MANIFEST = "run.json", "manifest.json"


def pyarrow_module():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ExplainError("format='parquet' needs the 'pyarrow' package: pip install pyarrow "
                           "(or write JSONL: format='jsonl')") from None
    return pyarrow


def write_shard(path: Path, rows: list[dict], fmt: str, id_kind: str) -> None:
    from ..fileio import atomic_path, atomic_write

    if fmt == "jsonl":
        atomic_write(path, "".join(json_line(row) for row in rows))
        return
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(_table(rows, id_kind), str(tmp))


def json_line(row: dict) -> str:
    # the wire form is strict JSON already: a non-finite float (an overflow in half precision) is
    # spelled as a string that float() reads back ("NaN", "Infinity")
    return json.dumps(row, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


def _table(rows: list[dict], id_kind: str):
    pa = pyarrow_module()
    ids, segment = pa.list_(pa.int64()), pa.struct([("label", pa.string()), ("start", pa.int64()),
                                                     ("end", pa.int64())])
    schema = pa.schema([
        ("id", pa.string() if id_kind == "str" else pa.int64()), ("format", pa.string()), ("version", pa.int64()),
        ("type", pa.string()), ("tokens", pa.list_(pa.string())), ("token_ids", ids),
        ("relevance", pa.list_(pa.float32())), ("target", pa.string()), ("target_ids", ids),
        ("target_logit", pa.float64()), ("method", pa.string()), ("evicted", pa.list_(pa.bool_())),
        ("layers", pa.string()), ("prompt", pa.string()), ("score_label", pa.string()),
        ("segments", pa.list_(segment))])
    return pa.Table.from_pylist([_parquet_row(row, id_kind) for row in rows], schema=schema)


def _parquet_row(row: dict, id_kind: str) -> dict:
    """A row as Parquet's typed columns hold it: numbers as floats (NaN and the infinities are
    native there), ``layers`` (a dict of tensors of any shape) as its JSON text."""
    from .wire import unspell

    layers = None if row["layers"] is None else json.dumps(row["layers"], allow_nan=False)
    return dict(row, id=str(row["id"]) if id_kind == "str" else row["id"], relevance=unspell(row["relevance"]),
                target_logit=unspell(row["target_logit"]), layers=layers)


def is_complete(path: Path, rows: int, fmt: str) -> bool:
    """A shard file exists with ``rows`` rows (written atomically, so never partial; another row
    count means the data changed since: the shard is redone)."""
    if not path.is_file():
        return False
    if fmt == "jsonl":
        return path.read_bytes().count(b"\n") == rows
    return pyarrow_module().parquet.read_metadata(str(path)).num_rows == rows


def read_results(out: str | Path) -> list[dict]:
    """The rows of a finished run (``DIR/manifest.json``), in record order, from JSONL or Parquet
    shards alike: ``id`` and the explanation's wire form (``Explanation.from_dict(row)`` rebuilds
    it; a diff run's rows: ``ExplanationDiff.from_dict(row)``), with every number a Python float
    (relevances the float32 values that were computed; NaN where the file spells ``"NaN"``). Rows
    an older lucidlm wrote are upgraded to this form.

    >>> read_results("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lucidlm.errors.ExplainError: /nonexistent/manifest.json: no such file (expected the manifest of a ...)
    """
    from ..fileio import read_json

    out = Path(out)
    manifest = read_json(out / MANIFEST, ExplainError, "the manifest of a finished explain-dataset run")
    rows: list[dict] = []
    for shard in manifest["shards"]:
        got = _read_shard(out / shard["file"], manifest["format"])
        if len(got) != shard["rows"]:
            raise ExplainError(f"{out / shard['file']}: {len(got)} rows, the manifest says {shard['rows']}")
        rows.extend(got)
    return rows


def _read_shard(path: Path, fmt: str) -> list[dict]:
    if not path.is_file():
        raise ExplainError(f"{path}: no such shard file (listed in {MANIFEST})")
    if fmt == "parquet":
        rows = pyarrow_module().parquet.read_table(str(path)).to_pylist()
        for row in rows:
            if row.get("layers") is not None:  # stored as JSON text (see _parquet_row)
                row["layers"] = json.loads(row["layers"])
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [_read_row(row) for row in rows]


def _read_row(row: dict) -> dict:
    """A stored row in the current wire form (an older version's row, with no ``format`` and the
    score under ``logit``, is upgraded), its numbers as floats (a diff's: in both explanations)."""
    from .wire import unspell

    if row.get("type") == "ExplanationDiff":
        return dict(row, base=_numbers(row["base"]), tuned=_numbers(row["tuned"]),
                    relevance=unspell(row["relevance"]), logit_delta=unspell(row["logit_delta"]),
                    adapter_relevance=unspell(row["adapter_relevance"]))
    if "format" not in row:
        from .explanation import Explanation

        row = {"id": row["id"], **Explanation.from_dict(row).to_dict()}
    return _numbers(row)


def _numbers(row: dict) -> dict:
    """An explanation's wire form with its numeric fields as floats."""
    from .wire import unspell

    return dict(row, relevance=unspell(row["relevance"]), target_logit=unspell(row["target_logit"]),
                layers=unspell(row["layers"]))

"""explain-dataset rows are the explanation's wire form plus the record's id: written to JSONL and
Parquet and read back to the same explanation, and rows an older lucidlm wrote (the score under
``logit``, no wire header) read back in the current form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lucidlm.explain import dataset as ds
from lucidlm.explain import shards
from lucidlm.explain.dataset import ROW_FIELDS, read_results
from lucidlm.explain.explanation import Explanation

from test_explanation_wire import v1_explanation

OLD_ROW = Path(__file__).parent / "data" / "wire_v1" / "row.jsonl"


def write_manifest(out: Path, fmt: str, rows: int) -> None:
    shard = {"file": f"shard-00000.{fmt}", "rows": rows}
    (out / "manifest.json").write_text(json.dumps({"format": fmt, "records": rows, "shards": [shard]}))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_row_holds_the_whole_explanation(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    e = v1_explanation()  # NaN and infinite values, evicted tokens, layers, a prompt and segments
    rows = [ds._row(ds.Item(0, "rec-0", "x", [1]), e), ds._row(ds.Item(1, 7, "x", [1]), e)]
    shards.write_shard(tmp_path / f"shard-00000.{fmt}", rows, fmt, "str")
    write_manifest(tmp_path, fmt, 2)
    back = read_results(tmp_path)
    # JSONL keeps each id as it is; Parquet has one id column, so mixed ids are text there
    assert [r["id"] for r in back] == ["rec-0", 7 if fmt == "jsonl" else "7"]
    for row in back:
        assert set(row) == set(ROW_FIELDS)
        assert Explanation.from_dict(row) == e
        assert isinstance(row["relevance"][3], float) and row["relevance"][3] != row["relevance"][3]  # NaN


def test_rows_an_older_lucidlm_wrote_are_upgraded(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    old = json.loads(OLD_ROW.read_text(encoding="utf-8"))
    want = Explanation.from_dict(old)
    jsonl, parquet = tmp_path / "j", tmp_path / "p"
    jsonl.mkdir()
    parquet.mkdir()
    (jsonl / "shard-00000.jsonl").write_text(OLD_ROW.read_text(encoding="utf-8"))
    write_manifest(jsonl, "jsonl", 1)
    # the Parquet schema of the version before the shared wire format
    schema = pa.schema([("id", pa.string()), ("tokens", pa.list_(pa.string())), ("token_ids", pa.list_(pa.int64())),
                        ("relevance", pa.list_(pa.float32())), ("target", pa.string()),
                        ("target_ids", pa.list_(pa.int64())), ("logit", pa.float64()), ("method", pa.string()),
                        ("score_label", pa.string()), ("evicted", pa.list_(pa.bool_()))])
    numbers = dict(old, relevance=[float(x) for x in old["relevance"]], logit=float(old["logit"]))
    pq.write_table(pa.Table.from_pylist([numbers], schema=schema), str(parquet / "shard-00000.parquet"))
    write_manifest(parquet, "parquet", 1)
    for out in (jsonl, parquet):
        row, = read_results(out)
        assert set(row) == set(ROW_FIELDS) and row["id"] == "rec-0" and "logit" not in row
        assert row["format"] == "lucidlm.explanation" and Explanation.from_dict(row) == want

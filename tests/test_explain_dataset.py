"""lucidlm explain-dataset / explain_dataset: rows equal single explanations, JSONL and Parquet agree,
shards resume, two torchrun processes write the same bytes as one, bad input is refused up front."""

import doctest
import json
import subprocess
import sys

import pytest
import torch

import lucidlm
from torchrun_util import TORCHRUN, one_and_two_processes, shard_bytes
from lucidlm.cli import main
from lucidlm.errors import DataError, ExplainError
from lucidlm.explain import batch as batch_module
from lucidlm.explain import dataset as ds
from lucidlm.explain.dataset import ROW_FIELDS, explain_dataset, read_results

CHAT = [{"role": "user", "content": "Name a colour."}]
RECORDS = [
    {"prompt": "The capital of France is", "id": "france"},
    {"prompt": "One, two, three,", "target": " four"},
    {"messages": CHAT, "target": 42},
    {"prompt": "Hello", "target": " world and more"},  # a continuation (several tokens)
    {"prompt": [1, 5, 7, 9], "target": [11, 12]},  # token ids; a continuation given as ids
    {"messages": CHAT + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
     "id": 70},
    {"prompt": "A B C D E F G", "target": " H"},
    {"prompt": "x"},
    {"prompt": "The quick brown fox jumps over the", "target": 3},
    {"prompt": "Water", "target": "ice"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def llm(tiny_lm_dir):
    return lucidlm.LLM.load(tiny_lm_dir)


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", RECORDS)


def rel_l2(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_rows_equal_single_explanations(llm, data, tiny_lm_dir, tmp_path):
    out = tmp_path / "out"
    run = explain_dataset(llm, data, out, shard_size=4, batch_size=3)
    assert (run.records, run.computed, run.shards) == (10, 10, ["shard-00000.jsonl", "shard-00001.jsonl",
                                                                 "shard-00002.jsonl"])
    assert [len(p.read_text().splitlines()) for p in sorted(out.glob("shard-*"))] == [4, 4, 2]
    rows = read_results(out)
    assert [r["id"] for r in rows] == ["france", 1, 2, 3, 4, 70, 6, 7, 8, 9]  # own id, else the index
    for record, row in zip(RECORDS, rows):
        assert set(row) == set(ROW_FIELDS)
        prompt = record.get("prompt")
        if prompt is None:  # the chat template's generation prompt closes the rendered chat
            assert llm.tokenizer.decode(row["token_ids"]).endswith("<|im_start|>assistant\n")
            prompt = row["token_ids"]
        single = llm.explain(prompt, target=record.get("target"))
        assert row["token_ids"] == single.token_ids and row["tokens"] == single.tokens
        assert len(row["relevance"]) == len(row["tokens"])
        assert rel_l2(row["relevance"], single.relevance.tolist()) < 1e-5
        assert row["target_logit"] == pytest.approx(single.target_logit, rel=1e-5)
        assert (row["target"], row["target_ids"], row["method"], row["score_label"]) == \
               (single.target, single.target_ids, "attnlrp", single.score_label)
    assert [r["score_label"] for r in rows[3:5]] == ["log-prob", "log-prob"]
    assert rows[1]["target"] == " four" and rows[2]["target_ids"] == [42]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 10 and manifest["method"] == "attnlrp" and manifest["format"] == "jsonl"
    assert manifest["model"] == str(tiny_lm_dir.resolve())  # what --model (and lucidlm faithfulness) loads back
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]


def test_parquet_round_trip(llm, data, tmp_path):
    pytest.importorskip("pyarrow")
    explain_dataset(llm, data, tmp_path / "j", method="cp-lrp", shard_size=6, batch_size=4)
    explain_dataset(llm, data, tmp_path / "p", method="cp-lrp", shard_size=6, batch_size=4, format="parquet")
    assert sorted(p.name for p in (tmp_path / "p").glob("shard-*")) == ["shard-00000.parquet",
                                                                          "shard-00001.parquet"]
    from_jsonl, from_parquet = read_results(tmp_path / "j"), read_results(tmp_path / "p")
    # ids of mixed types are one column of strings in Parquet; everything else is equal, bit for bit
    assert from_parquet == [dict(r, id=str(r["id"])) for r in from_jsonl]


def test_a_kv_cache_policy_marks_evicted_tokens(llm, tmp_path):
    prompt = list(range(1, 13))
    explain_dataset(llm, [{"prompt": prompt}], tmp_path / "o", kv_cache="window", cache_tokens=4)
    row, = read_results(tmp_path / "o")
    single = llm.explain(prompt, kv_cache="window", cache_tokens=4)
    assert row["evicted"] == single.evicted.tolist() and sum(row["evicted"]) == 7  # the window keeps 4 + the last
    assert row["relevance"] == single.relevance.tolist()  # one prompt: explained alone, bit for bit


def test_parquet_without_pyarrow(llm, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    with pytest.raises(ExplainError, match="format='parquet' needs the 'pyarrow' package"):
        explain_dataset(llm, data, tmp_path / "p", format="parquet")
    assert not (tmp_path / "p").exists()


def test_resume_redoes_only_missing_shards(llm, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    explain_dataset(llm, data, out, shard_size=3, batch_size=2)
    fresh = shard_bytes(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / "shard-00001.jsonl").unlink()  # a run killed before it wrote this shard
    (out / "manifest.json").unlink()
    seen = []
    real = batch_module.explain_batch

    def counting(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(map(list, prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(batch_module, "explain_batch", counting)
    run = explain_dataset(llm, data, out, shard_size=3, batch_size=2)
    assert run.computed == 3 and len(seen) == 3
    assert sorted(seen) == sorted([r["token_ids"] for r in read_results(out)[3:6]])
    assert shard_bytes(out) == fresh  # the redone shard is the one a fresh run wrote
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.glob("shard-*") if p.name != "shard-00001.jsonl")
    seen.clear()
    assert explain_dataset(llm, data, out, shard_size=3, batch_size=2).computed == 0 and not seen


def test_resume_with_other_settings_is_refused(llm, data, tmp_path):
    out = tmp_path / "out"
    explain_dataset(llm, [{"prompt": [1, 2]}], out)
    with pytest.raises(ExplainError, match=r"run\.json: this directory holds a run with method='attnlrp', but this "
                                           r"run has method='cp-lrp'"):
        explain_dataset(llm, data, out, method="cp-lrp")
    with pytest.raises(ExplainError, match="shard_size=1000.*shard_size=5"):
        explain_dataset(llm, data, out, shard_size=5)
    other = lucidlm.LLM(lucidlm.GPT(lucidlm.Config.from_name("tiny-llama")))
    with pytest.raises(ExplainError, match="model=.*tiny-lm.*but this run has model='tiny-llama'"):
        explain_dataset(other, data, out)
    (out / "run.json").unlink()  # the manifest is checked too
    with pytest.raises(ExplainError, match=r"manifest\.json: .*format='jsonl'.*format='parquet'"):
        explain_dataset(llm, data, out, format="parquet")
    (out / "manifest.json").unlink()
    with pytest.raises(ExplainError, match="holds shard files but no run.json"):
        explain_dataset(llm, data, out)


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "c"}'], r"data\.jsonl:2: malformed JSON"),
    (['{"prompt": "a"}', '', '{"text": "b"}'], r"data\.jsonl:3: no 'prompt' \(text or token ids\) or 'messages'"),
    (['{"prompt": "a", "messages": []}'], r"data\.jsonl:1: both 'prompt' and 'messages'"),
    (['{"prompt": ""}'], r"data\.jsonl:1: 'prompt' must be non-empty text"),
    (['{"messages": "hi"}'], r"data\.jsonl:1: 'messages' must be a non-empty list"),
    (['{"prompt": "a", "target": true}'], r"data\.jsonl:1: 'target' must be a token's text"),
    (['{"prompt": "a", "target": 99999999}'], r"data\.jsonl:1: target token id 99999999 is out of range"),
    (['{"prompt": "a", "id": [1]}'], r"data\.jsonl:1: 'id' must be a string or an integer"),
    (['[1, 2]'], r"data\.jsonl:1: expected a JSON object"),
])
def test_bad_records_are_refused_before_any_work(lines, match, llm, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines + ['{"prompt": "fine"}']) + "\n")
    with pytest.raises(DataError, match=match):
        explain_dataset(llm, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_arguments(llm, data, tmp_path, capsys):
    with pytest.raises(ExplainError, match="method='lime': expected one of attnlrp, cp-lrp, inputxgrad"):
        explain_dataset(llm, data, tmp_path / "o", method="lime")
    with pytest.raises(ExplainError, match="batch_size=0: expected a positive integer"):
        explain_dataset(llm, data, tmp_path / "o", batch_size=0)
    with pytest.raises(ExplainError, match="format='csv'"):
        explain_dataset(llm, data, tmp_path / "o", format="csv")
    with pytest.raises(DataError, match="custom.jsonl: no such file"):
        explain_dataset(llm, tmp_path / "custom.jsonl", tmp_path / "o")
    with pytest.raises(SystemExit) as exit_:
        main(["explain-dataset", str(data), "--out", str(tmp_path / "o"), "--method", "lime"])
    assert exit_.value.code == 2 and "argument --method: invalid choice: 'lime'" in capsys.readouterr().err
    assert main(["explain-dataset", str(data), "--hf-dataset", "x", "--out", str(tmp_path / "o")]) == 2
    assert "give DATA (a JSONL file) or --hf-dataset NAME, not both" in capsys.readouterr().err
    assert main(["explain-dataset", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_bad_record_answers_before_torch_loads(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a"}, {"text": "b"}])
    code = ("import sys; from lucidlm.cli import main; "
            f"status = main(['explain-dataset', {str(data)!r}, '--out', {str(tmp_path / 'o')!r}]); "
            "print(status, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "data.jsonl:2: no 'prompt'" in done.stderr and not (tmp_path / "o").exists()


def test_hf_dataset_from_disk(llm, tiny_lm_dir, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": "The capital of France is", "target": None}, {"prompt": "One, two,", "target": " three"},
               {"prompt": "Hello", "target": "!"}]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
    common = ["--model", str(tiny_lm_dir), "--no-progress", "--shard-size", "2"]
    assert main(["explain-dataset", "--hf-dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "a"), *common]) == 0
    assert "explained 3 records with attnlrp (3 now, 0 from an earlier run)" in capsys.readouterr().err
    assert main(["explain-dataset", "--hf-dataset", str(tmp_path / "dd"), "--split", "test",
                 "--out", str(tmp_path / "b"), *common]) == 0
    jsonl = write_jsonl(tmp_path / "same.jsonl", records)
    assert main(["explain-dataset", str(jsonl), "--out", str(tmp_path / "c"), *common]) == 0
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b") == shard_bytes(tmp_path / "c")
    assert [r["id"] for r in read_results(tmp_path / "a")] == [0, 1, 2]  # the row index
    assert main(["explain-dataset", "--hf-dataset", str(tmp_path / "dd"), "--split", "train",
                 "--out", str(tmp_path / "d"), *common]) == 2
    assert "no split 'train' (it has test)" in capsys.readouterr().err


def test_hf_dataset_is_never_downloaded(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    offline = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(DataError, match="not a local dataset directory, nor in the local Hugging Face cache"):
        ds.load_hf_dataset("lucidlm-test/no-such-dataset-here")
    assert datasets.config.HF_HUB_OFFLINE == offline  # offline for that call only
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="--hf-dataset needs the 'datasets' package"):
        ds.load_hf_dataset(str(tmp_path))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_two_processes_write_the_bytes_of_one(tiny_lm_dir, data, tmp_path):
    args = ["explain-dataset", str(data), "--model", str(tiny_lm_dir), "--shard-size", "3", "--batch-size", "2"]
    done = one_and_two_processes(args, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert len(shard_bytes(one)) == 4 and shard_bytes(two) == shard_bytes(one)
    assert (two / "manifest.json").read_bytes() == (one / "manifest.json").read_bytes()
    ids = [r["id"] for r in read_results(two)]
    assert sorted(map(str, ids)) == sorted(map(str, ["france", 1, 2, 3, 4, 70, 6, 7, 8, 9]))  # each exactly once
    assert done.stderr.count("explained 10 records with attnlrp (10 now") == 1  # rank 0 reports


def test_doctests():
    for module in (ds, batch_module):
        assert doctest.testmod(module).failed == 0

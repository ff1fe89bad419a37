"""explain-dataset --diff-against and diff-report: rows equal single diffs, resumes refuse another base
or adapter, two torchrun processes write the bytes of one, and the report's numbers are the
definitions' (words, components, adapter share, score changes) on diffs made by hand."""

import doctest
import json

import pytest
import torch
from cli_probe import probe
from diff_util import make_adapter
from torchrun_util import TORCHRUN, one_and_two_processes, shard_bytes

from lucidlm import GPT, LLM, Config
from lucidlm.cli import main
from lucidlm.errors import ExplainError
from lucidlm.explain import dataset as ds
from lucidlm.explain import diff_report as report_module
from lucidlm.explain import shards
from lucidlm.explain.dataset import DIFF_ROW_FIELDS, explain_dataset, read_results
from lucidlm.explain.diff import ExplanationDiff, explain_diff
from lucidlm.explain.diff_report import adapter_share, diff_report
from lucidlm.explain.explanation import Explanation

pytest.importorskip("peft")

RECORDS = [
    {"prompt": "The capital of France is", "id": "france"},
    {"prompt": "One, two, three,", "target": " four"},
    {"messages": [{"role": "user", "content": "Name a colour."}], "target": 42},
    {"prompt": "Hello", "target": " world and more"},  # a continuation
    {"prompt": [1, 5, 7, 9], "target": [11, 12]},
    {"prompt": "The capital of Italy is"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def adapter(tiny_lm_dir, tmp_path_factory):
    return make_adapter(tiny_lm_dir, tmp_path_factory.mktemp("adapter"), seed=1)


@pytest.fixture(scope="module")
def models(tiny_lm_dir, adapter):
    """(tuned, base): the tiny checkpoint with and without the adapter."""
    return LLM.load(tiny_lm_dir, adapter=adapter), LLM.load(tiny_lm_dir)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", RECORDS)


# ----------------------------------------------------------------------------- explain-dataset --diff-against
def test_rows_equal_single_diffs(models, data, tiny_lm_dir, tmp_path):
    tuned, base = models
    run = explain_dataset(tuned, data, tmp_path / "out", shard_size=4, diff_against=base)
    assert (run.records, run.computed, run.against) == (6, 6, str(tiny_lm_dir.resolve()))
    rows = read_results(tmp_path / "out")
    assert [r["id"] for r in rows] == ["france", 1, 2, 3, 4, 5]
    for record, row in zip(RECORDS, rows):
        assert tuple(row) == DIFF_ROW_FIELDS and row["type"] == "ExplanationDiff"
        prompt = record.get("prompt", row["tuned"]["token_ids"])  # a chat: the ids its template rendered
        single = explain_diff(tuned.model, tuned.tokenizer, base.model, base.tokenizer, prompt,
                              target=record.get("target"))
        got = ExplanationDiff.from_dict(row)
        assert got.tuned.target_ids == got.base.target_ids == single.tuned.target_ids
        assert got.tuned.token_ids == single.tuned.token_ids and got.tuned.method == "cp-lrp"
        torch.testing.assert_close(got.relevance, single.relevance, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.adapter_relevance, single.adapter_relevance, rtol=1e-5, atol=1e-7)
        assert got.logit_delta == pytest.approx(single.logit_delta, rel=1e-5, abs=1e-7)
        assert got.component_changes("heads") == pytest.approx(single.component_changes("heads"), rel=1e-4, abs=1e-7)
    assert rows[0]["tuned"]["prompt"] == "The capital of France is"  # text rows keep it (word alignment)
    assert rows[3]["tuned"]["score_label"] == "log-prob"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["fields"] == list(DIFF_ROW_FIELDS) and manifest["diff_against"] == str(tiny_lm_dir.resolve())
    assert manifest["method"] == "cp-lrp" and manifest["adapter"] == ds.adapter_id(tuned.model) is not None


def test_resume_refuses_another_base_or_adapter(models, data, tiny_lm_dir, tmp_path):
    tuned, base = models
    out = tmp_path / "out"
    explain_dataset(tuned, data, out, shard_size=4, diff_against=base)
    before = shard_bytes(out)
    (out / "shard-00001.jsonl").unlink()
    again = explain_dataset(tuned, data, out, shard_size=4, diff_against=base)
    assert again.computed == 2 and shard_bytes(out) == before  # only the missing shard, the same bytes
    other = make_adapter(tiny_lm_dir, tmp_path / "other", seed=2)
    with pytest.raises(ExplainError, match="adapter="):
        explain_dataset(LLM.load(tiny_lm_dir, adapter=other), data, out, shard_size=4, diff_against=base)
    with pytest.raises(ExplainError, match="diff_against="):
        explain_dataset(tuned, data, out, shard_size=4, diff_against=LLM.load(tiny_lm_dir, adapter=other))
    with pytest.raises(ExplainError, match="diff_against='.*', but this run has diff_against=None"):
        explain_dataset(tuned, data, out, shard_size=4, method="cp-lrp")
    assert shard_bytes(out) == before


def test_what_a_diff_run_refuses_up_front(models, data, tmp_path):
    tuned, base = models
    with pytest.raises(ExplainError, match="format='parquet' with diff_against"):
        explain_dataset(tuned, data, tmp_path / "o", format="parquet", diff_against=base)
    with pytest.raises(ExplainError, match="kv_cache='window' with diff_against"):
        explain_dataset(tuned, data, tmp_path / "o", kv_cache="window", diff_against=base)
    other = LLM(GPT(Config.from_name("tiny-llama")).eval())
    with pytest.raises(ExplainError, match="base is not the tuned model's architecture"):
        explain_dataset(tuned, data, tmp_path / "o", diff_against=other)
    assert not (tmp_path / "o").exists()


def test_layers_choose_the_latents_a_row_holds(models, data, tmp_path):
    tuned, base = models
    last = explain_dataset(tuned, data, tmp_path / "last", diff_against=base, layers=[-1])
    rows = read_results(last.out)
    assert all(set(r["base"]["layers"]) == set(r["tuned"]["layers"]) == {"layers.1.attn", "layers.1.mlp"}
               for r in rows)
    assert json.loads((last.out / "manifest.json").read_text())["layers"] == [1]
    assert [c["name"] for c in diff_report(rows).components["layers"]] == ["layers.1"]
    with pytest.raises(ExplainError, match=r"layers=\[1\], but this run has layers='all'"):
        explain_dataset(tuned, data, last.out, diff_against=base)  # a diff's default: every layer
    none = explain_dataset(tuned, data, tmp_path / "none", diff_against=base, layers=None)
    rows = read_results(none.out)
    assert all(r["base"]["layers"] is None and r["tuned"]["layers"] is None for r in rows)
    assert diff_report(rows).components == {} and diff_report(rows).words
    plain = explain_dataset(base, RECORDS[:2], tmp_path / "plain", method="cp-lrp", layers="all")
    assert [sorted(r["layers"]) for r in read_results(plain.out)] == [
        ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"]] * 2
    with pytest.raises(ExplainError, match="layers: 5 is not a layer index of this 2-layer model"):
        explain_dataset(tuned, data, tmp_path / "bad", diff_against=base, layers=[5])
    assert not (tmp_path / "bad").exists()
    assert main(["explain-dataset", str(data), "--out", str(tmp_path / "cli"), "--model", str(tuned.source),
                 "--diff-against", str(base.source), "--layers", "none", "--no-progress", "--limit", "2"]) == 0
    assert [r["tuned"]["layers"] for r in read_results(tmp_path / "cli")] == [None, None]


@pytest.mark.parametrize("args, needle", [
    (["--layers", "x"], "argument --layers: expected all, none or layer indices such as 0,5,-1, got 'x'"),
    (["--diff-against", "{tmp}/absent"], "argument --diff-against: {tmp}/absent does not exist"),
    (["--adapter", "{tmp}/none"], "{tmp}/none: no such file or directory (--adapter)"),
    (["--diff-against", "{model}", "--format", "parquet"], "format='parquet' with diff_against"),
    (["--diff-against", "{model}", "--kv-cache", "window"], "kv_cache='window' with diff_against"),
])
def test_command_refusals_come_before_anything_loads(args, needle, data, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))

    def fill(text):
        return text.replace("{tmp}", str(tmp_path)).replace("{model}", str(model))

    result, stderr = probe("explain-dataset", data, "--out", tmp_path / "o", "--model", model,
                           *map(fill, args), watched=model)
    lines = stderr.strip().splitlines()
    assert result["status"] == 2 and len(lines) == 1 and fill(needle) in lines[0], stderr
    assert result["opened"] == [] and result["heavy"] == [] and not (tmp_path / "o").exists()


def test_the_commands_end_to_end(tiny_lm_dir, adapter, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["explain-dataset", str(data), "--model", str(tiny_lm_dir), "--adapter", str(adapter),
                 "--diff-against", str(tiny_lm_dir), "--out", str(out), "--no-progress"]) == 0
    assert f"explained 6 records as diffs against {tiny_lm_dir.resolve()} with cp-lrp (6 now" in capsys.readouterr().err
    assert main(["diff-report", str(out), "--top", "3", "--json", str(tmp_path / "r.json"),
                 "--png", str(tmp_path / "r.png")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    expected = diff_report(read_results(out), top=3)
    assert saved == json.loads(json.dumps(expected.to_dict()))
    assert saved["format"] == "lucidlm.diff-report" and saved["records"] == 6 and len(saved["words"]) == 3
    assert sorted(saved["components"]) == ["heads", "layers", "neurons"]
    assert printed.startswith(f"{out}: 6 diffs (cp-lrp;") and saved["components"]["heads"][0]["name"] in printed
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["diff-report", str(tmp_path / "r.png")]) == 2  # not a run directory
    explain_dataset(LLM.load(tiny_lm_dir), data, tmp_path / "plain", method="cp-lrp")
    assert main(["diff-report", str(tmp_path / "plain")]) == 2
    assert "expected a diff" in capsys.readouterr().err


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_two_processes_write_the_bytes_of_one(tiny_lm_dir, adapter, data, tmp_path):
    args = ["explain-dataset", str(data), "--model", str(tiny_lm_dir), "--adapter", str(adapter),
            "--diff-against", str(tiny_lm_dir), "--shard-size", "2"]
    done = one_and_two_processes(args, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert len(shard_bytes(one)) == 3 and shard_bytes(two) == shard_bytes(one)
    assert (two / "manifest.json").read_bytes() == (one / "manifest.json").read_bytes()
    assert done.stderr.count("explained 6 records as diffs against") == 1  # rank 0 reports


# ----------------------------------------------------------------------------- the report's numbers
def made(tokens, base, tuned, adapter=None, prompt=None, base_score=0.0, tuned_score=0.0, layers=None):
    """A diff from given relevances (``layers``: (base latents, tuned latents) or None)."""
    def explanation(relevance, score, latents):
        return Explanation(tokens, list(range(len(tokens))), torch.tensor(relevance), " x", [7], score, "cp-lrp",
                           prompt=prompt, layers=latents)

    base_layers, tuned_layers = layers or (None, None)
    return ExplanationDiff(explanation(base, base_score, base_layers), explanation(tuned, tuned_score, tuned_layers),
                           None if adapter is None else torch.tensor(adapter))


def latents(attn, mlp):
    return {"layers.0.attn": torch.tensor(attn), "layers.0.mlp": torch.tensor(mlp)}


def test_words_components_share_and_scores_follow_their_definitions():
    one = made(["The", " cap", "ital", " of", " France"], [1.0, 0.0, 0.0, 0.5, 1.0], [1.0, 1.0, 2.0, 0.5, 0.0],
               adapter=[0.0, 1.0, 1.0, 0.0, 0.0], prompt="The capital of France", base_score=-3.0, tuned_score=-1.0,
               layers=(latents([0.0, 1.0], [0.5, 0.5, 0.0]), latents([2.0, 0.0], [0.5, 1.5, 0.0])))
    two = made([" France", " is", " big"], [0.0, 0.0, 0.0], [-1.0, 0.25, 0.0], adapter=[-1.0, 0.0, 0.0],
               base_score=-2.0, tuned_score=-2.5,
               layers=(latents([0.0, 0.0], [0.0, 0.0, 0.0]), latents([1.0, 1.0], [0.0, 0.5, -1.0])))
    report = diff_report([one, two], top=3)
    # capital: +1 +2 (one word of two tokens); France: -1 in each record; is: +0.25
    assert report.words == [{"word": "capital", "mean_change": 3.0, "count": 1},
                            {"word": "France", "mean_change": -1.0, "count": 2},
                            {"word": "is", "mean_change": 0.25, "count": 1}]
    assert diff_report([one, two], top=3, min_count=2).words == [{"word": "France", "mean_change": -1.0, "count": 2}]
    heads = {c["name"]: c["mean_change"] for c in report.components["heads"]}
    assert heads == {"layers.0.attn.head.0": 1.5, "layers.0.attn.head.1": 0.0}  # (2 + 1) / 2, (-1 + 1) / 2
    assert report.components["layers"] == [{"name": "layers.0", "mean_change": 1.75}]  # (4 - 2 + 1.5 - 0) / 2
    assert [c["name"] for c in report.components["neurons"]] == ["layers.0.mlp.neuron.1", "layers.0.mlp.neuron.0",
                                                                  "layers.0.mlp.neuron.2"]  # 0.75, 0, -0.5
    # one: |a| = 2, |tuned - a| = 1 + 0 + 1 + 0.5 = 2.5 -> 2 / 4.5; two: |a| = 1, |b| = 0.25 -> 0.8
    assert adapter_share(one) == pytest.approx(2 / 4.5) and adapter_share(two) == pytest.approx(0.8)
    assert report.adapter_share == pytest.approx((2 / 4.5 + 0.8) / 2) and report.adapter_records == 2
    assert report.scores == pytest.approx({"mean": 0.75, "median": 0.75, "rose": 0.5, "min": -0.5, "max": 2.0,
                                           "base": -2.5, "tuned": -1.75})
    assert report.deltas == [2.0, -0.5]
    text = report.to_text()
    assert "rose in 50% of records" in text and "'capital'" in text and "layers.0.attn.head.0" in text


def test_rows_and_diffs_give_the_same_report_and_no_adapter_is_none():
    d = made(["a", " b"], [0.5, 0.5], [0.0, 2.0], base_score=1.0, tuned_score=2.5)
    row = {"id": 0, **json.loads(json.dumps(d.to_dict()))}
    assert diff_report([row]).to_dict() == diff_report([d]).to_dict()
    report = diff_report([d])
    assert report.adapter_share is None and report.components == {} and "adapter share: none" in report.to_text()
    assert report.to_png()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_adapter_at_its_initial_state_has_no_share(tiny_lm_dir, tmp_path):
    zero = make_adapter(tiny_lm_dir, tmp_path / "zero", scale=0.0)
    run = explain_dataset(LLM.load(tiny_lm_dir, adapter=zero), RECORDS[:3], tmp_path / "out",
                          diff_against=LLM.load(tiny_lm_dir))
    report = diff_report(read_results(run.out))
    assert report.adapter_share == 0.0 and report.adapter_records == 3
    assert all(w["mean_change"] == 0 for w in report.words) and report.scores["rose"] == 0
    assert all(c["mean_change"] == 0 for ranked in report.components.values() for c in ranked)


def test_bad_report_input():
    e = Explanation(["a"], [1], torch.tensor([1.0]), " x", [7], 1.0, "cp-lrp")
    with pytest.raises(ExplainError, match="record 1: expected a diff .* got 'Explanation'"):
        diff_report([made(["a"], [0.0], [1.0]), {"id": 1, **e.to_dict()}])
    with pytest.raises(ExplainError, match="no diffs"):
        diff_report([])
    with pytest.raises(ExplainError, match="top=0: expected a positive integer"):
        diff_report([made(["a"], [0.0], [1.0])], top=0)


def test_doctests():
    for module in (ds, shards, report_module):
        assert doctest.testmod(module).failed == 0

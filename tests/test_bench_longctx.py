"""lucidlm bench longctx: one prompt's measurement against independent references, the bench end to
end (its table, heatmap and kvpress results folders), and bad options (typed errors, exit 2, before
loading). The generator and the scoring are tested in tests/test_bench_ruler.py."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch.nn import functional as F

from lucidlm.bench import longctx

HAYSTACK = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
            "and associated documentation files, to deal in the Software without restriction.\n") * 60


def test_one_prompt_against_generate_and_a_full_forward(tiny_lm_dir, monkeypatch):
    import lucidlm
    from lucidlm.cache.base import KVCache
    from lucidlm.generate import generate_ids

    told, end_prompt = [], KVCache.end_prompt
    def spy(self, model, input_ids, positions, question=None):  # what the cache is told at the prompt's end
        told.append((input_ids.shape[1], question))
        return end_prompt(self, model, input_ids, positions, question)

    monkeypatch.setattr(KVCache, "end_prompt", spy)

    llm = lucidlm.LLM.load(tiny_lm_dir)
    sample = longctx.make_samples(llm.tokenizer, HAYSTACK, ["passkey"], [120], [0.5], seed=1)[0]
    one = longctx.run_one(llm.model, llm.tokenizer, sample, "dense", 200, chunk_size=32)
    new = len(llm.tokenizer.encode(" " + sample.answers[0], add_special_tokens=False)) + 2
    ref = [t[0] for t in generate_ids(llm.model, [sample.ids], max_new_tokens=new, chunk_size=32)]
    assert one["text"] == llm.tokenizer.decode(ref)
    assert one["score"] == float(sample.answers[0] in llm.tokenizer.decode(ref))
    with torch.no_grad():  # dense: the summed NLL of one full forward pass
        logits = llm.model(torch.tensor([sample.ids]))[0, :-1]
    nll = F.cross_entropy(logits.float(), torch.tensor(sample.ids[1:]), reduction="sum").item()
    assert one["n_tokens"] == 119 and one["nll"] == pytest.approx(nll, rel=1e-4)
    evicting = longctx.run_one(llm.model, llm.tokenizer, sample, "h2o", 30, chunk_size=32)
    ref = [t[0] for t in generate_ids(llm.model, [sample.ids], max_new_tokens=new, kv_cache="h2o",
                                      cache_tokens=30, chunk_size=32)]
    assert evicting["text"] == llm.tokenizer.decode(ref)  # the same policy, the same greedy answer
    assert evicting["memory_bytes"] < one["memory_bytes"] and not evicting["holds"]
    # a press reads the prompt whole and is told its question, as generate() tells it
    press = longctx.run_one(llm.model, llm.tokenizer, sample, "snapkv-q", 30, chunk_size=32)
    ref = [t[0] for t in generate_ids(llm.model, [sample.ids], max_new_tokens=new, kv_cache="snapkv-q",
                                      cache_tokens=30, chunk_size=32, question_tokens=sample.question_tokens)]
    assert press["holds"] and press["text"] == llm.tokenizer.decode(ref)
    assert told == [(120, sample.question_tokens)] * 2  # once per run: the whole prompt, its question marked
    assert press["nll"] == pytest.approx(nll, rel=1e-4)  # the prompt read whole: dense's perplexity


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    longctx.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_end_to_end_prints_the_tables_a_png_and_kvpress_folders(tiny_lm_dir, tmp_path, capsys):
    import matplotlib.image

    from lucidlm.bench import kvpress_results

    png, results = tmp_path / "acc.png", tmp_path / "results"
    args = _args(["--model", str(tiny_lm_dir), "--lengths", "128,160", "--depths", "0,100", "--tasks",
                  "passkey,niah_single", "--policies", "window,snapkv(window=4)", "--cache-tokens", "50%",
                  "--chunk-size", "32", "--heatmap", str(png), "--results", str(results)])
    assert longctx.run(args) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[1] == ("| policy | of prompt | accuracy | passkey | niah_single | L=128 | L=160 | worst ÷ dense | "
                        "perplexity | vs dense | cache MiB | decode tok/s |")
    rows = [line.split(" | ") for line in lines[3:6]]
    assert [r[0].lstrip("| ") for r in rows] == ["dense", "window", "snapkv(window=4)"]
    assert [r[1] for r in rows] == ["100%", "50%", "50%"] and rows[0][9] == "+0.0%"
    assert rows[0][7] in {"1.00", "-"}  # dense against itself
    for r in rows:  # accuracy: a whole number of the 8 prompts, 2 per (task, length)
        assert r[2] in {f"{100 * k / 8:.0f}%" for k in range(9)}
        assert all(c in {"0%", "50%", "100%"} for c in r[3:5])  # 2 prompts per task and length: 4 per task
        assert all(c in {f"{25 * k}%" for k in range(5)} for c in r[3:7])
    detail = lines[lines.index("| policy | of prompt | task | L=128 | L=160 | d=0% | d=100% |"):]
    assert [d.split(" | ")[2] for d in detail[2:8]] == ["passkey", "niah_single"] * 3
    assert lines[-2] == f"heatmap: {png}" and lines[-1].startswith(f"results: {results}")
    assert "bench longctx: 100%|" in err
    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 200
    folders = sorted(p.name for p in results.iterdir())
    assert len(folders) == 6 and all(f.startswith("ruler__") and f.endswith("__query_aware") for f in folders)
    model = folders[0].split("__")[2]
    dense = kvpress_results.read_results(results / f"ruler__128__{model}__dense__0.00__query_aware")
    window = kvpress_results.read_results(results / f"ruler__160__{model}__window__0.50__query_aware")
    assert len(dense["predictions"]) == 4 and window["config"]["compression_ratio"] == 0.5
    assert window["config"]["lucidlm"]["slots"] == 80 and window["config"]["press_name"] == "window"
    # the folders' metrics pool to the table's per-task accuracy (passkey column, window row)
    scores = [p["score"] for length in (128, 160) for p in kvpress_results.read_results(
        results / f"ruler__{length}__{model}__window__0.50__query_aware")["predictions"] if p["task"] == "passkey"]
    assert rows[1][3] == f"{100 * sum(scores) / len(scores):.0f}%"


@pytest.mark.parametrize("flag, value, message", [
    ("--depths", "0,150", "--depths '0,150': expected a comma-separated list of percentages in [0, 100]"),
    ("--depths", "-5", "--depths '-5'"), ("--lengths", "abc", "--lengths 'abc'"),
    ("--tasks", "passkey,quiz", "--tasks: unknown task 'quiz'; expected some of passkey, needle, niah_single, "
                                "niah_multikey, niah_multivalue, vt, cwe"),
    ("--cache-tokens", "25%,150%", "--cache-tokens '25%,150%': cache_tokens='150%': a share must be in (0%, 100%]"),
    ("--cache-tokens", "half", "--cache-tokens 'half'"), ("--policies", "lru", "lru"),
    ("--trials", "0", "--trials 0"),
])
def test_bad_options_exit_2_with_one_line_before_loading_torch(flag, value, message):
    import subprocess
    import sys

    code = ("import sys; from lucidlm.cli import main; rc = main(['bench', 'longctx', sys.argv[1], sys.argv[2]]); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, flag, value], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"]
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr

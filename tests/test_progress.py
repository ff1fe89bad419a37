"""No silent long work: benches, perplexity and GGUF conversion show a progress bar on stderr, and
the benches print their table on stdout row by row, as each row is measured."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import lucidlm
from lucidlm.bench import decode as bench_decode
from lucidlm.bench import explain as bench_explain
from lucidlm.bench import faithfulness as bench_faithfulness
from lucidlm.bench import kv as bench_kv
from lucidlm.bench import train as bench_train
from test_gguf import _write_tiny

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ") * 4


def _args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _bar_in(err: str, desc: str) -> bool:
    return f"{desc}: 100%|" in err


# ----------------------------------------------------------------------------- bench kv, for real


def test_bench_kv_streams_rows_on_stdout_and_a_bar_on_stderr(tiny_lm_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    done = subprocess.run(
        [sys.executable, "-m", "lucidlm", "bench", "kv", "--model", str(tiny_lm_dir), "--text", str(text),
         "--tokens", "64", "--fractions", "0.5", "--policies", "window", "--chunk-size", "16",
         "--decode-steps", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{tiny_lm_dir}: 64 tokens, chunk 16, 2 decode steps")
    assert lines[1].startswith("| policy | cache tokens |") and lines[2].startswith("|---|")
    assert [line.split("|")[1].strip() for line in lines[3:]] == ["dense", "window"]
    assert "\r" not in done.stdout and "%|" not in done.stdout  # stdout: the table only
    assert _bar_in(done.stderr, "bench kv") and "perplexity:" in done.stderr


def test_bench_kv_prints_each_row_before_measuring_the_next(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    real, seen = bench_kv.measure_one, []

    def measure_one(*args, **kwargs):
        seen.append(capsys.readouterr().out)  # what stdout held when this run started
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_kv, "measure_one", measure_one)
    args = _args(bench_kv, ["--model", str(tiny_lm_dir), "--text", str(text), "--tokens", "64",
                            "--fractions", "0.25,0.5", "--policies", "window", "--decode-steps", "2"])
    assert bench_kv.run(args) == 0
    last = capsys.readouterr().out
    assert "| policy |" in seen[0] and "| dense |" not in seen[0]  # the header before any row
    assert "| dense |" in seen[1] and "| window | 16 |" in seen[2] and "| window | 32 |" in last


# ----------------------------------------------------------------------------- benches with child processes


def _fake_children(monkeypatch, module, result):
    calls = []

    def child(args, *rest):
        calls.append(rest)
        return result(*rest)

    monkeypatch.setattr(module, "_child", child)
    monkeypatch.setattr("lucidlm.bench.prepare_model", lambda model: None)
    return calls


def test_bench_decode_prints_header_first_rows_when_final(monkeypatch, capsys):
    outputs = []

    def result(engine, dtype):
        outputs.append(capsys.readouterr().out)
        return {"engine": engine, "dtype": dtype, "prefill_tps": 100.0, "decode_tps": 10.0, "batch_tps": 40.0,
                "peak_rss_mb": 500.0, "tokens": [1, 2, 3], "warm_up_s": 0.5}

    _fake_children(monkeypatch, bench_decode, result)
    args = _args(bench_decode, ["--rounds", "2", "--dtypes", "float32"])
    assert bench_decode.run(args) == 0
    out, err = capsys.readouterr()
    assert outputs[0].startswith("decode benchmark:") and "engine" in outputs[0]
    assert "lucidlm " not in "".join(outputs[:3])  # rows are medians: after the row's last round
    assert outputs[3].splitlines()[-1].startswith("transformers")
    assert [line.split()[:2] for line in out.splitlines()[:2]] == [["lucidlm", "float32"],
                                                                  ["float32:", "decode"]]
    assert _bar_in(err, "bench decode")


def test_bench_explain_prints_each_row_when_measured(monkeypatch, capsys):
    printed = []

    def result(row, length):
        printed.append((row, length, capsys.readouterr().out))
        return {"seconds": 1.0 if row == "forward+backward" else 0.5, "peak_mib": 10.0, "threads": 1}

    _fake_children(monkeypatch, bench_explain, result)
    args = _args(bench_explain, ["--lengths", "16,32", "--methods", "attnlrp"])
    assert bench_explain.run(args) == 0
    out, err = capsys.readouterr()
    assert [(row, n) for row, n, _ in printed] == [("forward+backward", 16), ("forward+backward", 32),
                                                   ("forward", 16), ("forward", 32), ("attnlrp", 16), ("attnlrp", 32)]
    assert printed[0][2].startswith("explanation cost:")  # the header before any measurement
    rows = [line.split()[0] for line in printed[4][2].splitlines()]  # before attnlrp: forward, f+b shown
    assert rows == ["forward", "forward+backward"]
    assert out.split()[0] == "attnlrp" and "0.500   0.50" in out
    assert _bar_in(err, "bench explain")


def test_bench_train_prints_rows_as_they_finish(monkeypatch, capsys):
    seen = []

    def result(directory, engine, method):
        seen.append(capsys.readouterr().out)
        return {"engine": engine, "method": method, "tps": 50.0, "peak_rss_mb": 700.0, "losses": [3.0, 2.5]}

    _fake_children(monkeypatch, bench_train, result)
    monkeypatch.setattr(bench_train, "_checkpoint_dir", lambda model: "ckpt")
    args = _args(bench_train, ["--methods", "lora,full"])
    assert bench_train.run(args) == 0
    out, err = capsys.readouterr()
    assert seen[0].startswith("train benchmark:") and "tokens/s" in seen[0]
    assert seen[1].split()[:2] == ["lora", "lucidlm"] and seen[3].split()[:2] == ["full", "lucidlm"]
    assert "lora: losses agree: yes" in out and "full: losses agree: yes" in out
    assert _bar_in(err, "bench train")


def test_bench_faithfulness_shows_a_bar_per_prompt(tiny_lm_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOne, two, three,\n")
    args = _args(bench_faithfulness, ["--model", str(tiny_lm_dir), "--prompts", str(prompts),
                                      "--methods", "attnlrp,random"])
    assert bench_faithfulness.run(args) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == (f"faithfulness on {tiny_lm_dir}: 2 prompts, each explained for its top next token; "
                        "score prob, tokens replaced by ' ' (id 216)")
    assert [line.split()[0] for line in lines[3:5]] == ["attnlrp", "random"]
    assert lines[5].startswith("2 prompts in ")
    assert _bar_in(err, "bench faithfulness") and "ABPC attnlrp" in err


def test_bench_doctests():
    import doctest

    from lucidlm.bench import serve as bench_serve

    for module in (bench_kv, bench_serve, bench_faithfulness, bench_explain):
        assert doctest.testmod(module).failed == 0


# ----------------------------------------------------------------------------- perplexity, conversion


def test_perplexity_progress_goes_to_stderr(tiny_lm_dir, capsys):
    llm = lucidlm.LLM.load(tiny_lm_dir)
    llm.perplexity(TEXT, chunk_size=16, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "perplexity:" in err and "tok" in err
    llm.perplexity(TEXT, chunk_size=16)
    assert capsys.readouterr() == ("", "")


def test_gguf_conversion_says_what_it_does(tmp_path, capsys):
    from lucidlm.checkpoints.gguf import gguf_to_hf_dir

    path = _write_tiny(tmp_path / "tiny.gguf")
    gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert f"converting tiny.gguf to a float32 Hugging Face checkpoint in {tmp_path / 'cache'}" in err
    assert "Converting tiny.gguf: 100%|" in err and "writing model.safetensors" in err
    gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=True)  # a hit: nothing to say
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("line", ["| a | b |", ""])
def test_emit_writes_and_flushes_stdout(line, capsys):
    from lucidlm.bench import emit

    emit(line)
    assert capsys.readouterr() == (line + "\n", "")

"""``lucidlm bench decode --llama-bench`` and ``lucidlm bench quant`` without llama.cpp: its JSON
report read from a recorded sample (llama-bench's own output, tests/data/llama_bench_q8_0.json,
from ``llama-bench -m smollm2-q8_0.gguf -t 2 -p 32 -n 8 -r 1 -o json``), a stand-in binary for the
run itself (command line, exit status, the child's own peak RSS), and the decode table's rows."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import pytest

from lucidlm.bench import decode as bench_decode
from lucidlm.bench import quant as bench_quant
from lucidlm.bench.llamacpp import gguf_type, parse_llama_bench, run_llama_bench
from lucidlm.errors import ConfigError

SAMPLE = pathlib.Path(__file__).parent / "data" / "llama_bench_q8_0.json"
#: a real report of ``-p 512 -n 64 -d 0,512`` (llama.cpp 10630, SmolLM2-135M Q8_0, 2 threads)
DEPTH_SAMPLE = pathlib.Path(__file__).parent / "data" / "llama_bench_q8_0_depth.json"


def _args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_parses_the_recorded_report():
    report = parse_llama_bench(SAMPLE.read_text())
    raw = json.loads(SAMPLE.read_text())  # the prefill test first, then the decode test
    assert report == {"prefill_tps": raw[0]["avg_ts"], "decode_tps": raw[1]["avg_ts"],
                      "model_type": "llama 256M Q8_0", "threads": 2}
    assert report["prefill_tps"] == pytest.approx(163.172295) and report["decode_tps"] == pytest.approx(18.673847)


def test_decode_is_read_after_the_prompt_and_prefill_from_an_empty_context():
    raw = json.loads(DEPTH_SAMPLE.read_text())
    by_test = {(t["n_prompt"], t["n_gen"], t["n_depth"]): t["avg_ts"] for t in raw}
    report = parse_llama_bench(DEPTH_SAMPLE.read_text(), decode_depth=512)
    assert report["prefill_tps"] == by_test[(512, 0, 0)] and report["decode_tps"] == by_test[(0, 64, 512)]
    # the decode from an empty context is the other, faster number
    assert parse_llama_bench(DEPTH_SAMPLE.read_text())["decode_tps"] == by_test[(0, 64, 0)] > report["decode_tps"]


@pytest.mark.parametrize("text, message", [
    ("| model | size |", "expected its JSON report"),
    ('{"avg_ts": 1}', "a JSON list of tests"),
    (json.dumps([{"n_prompt": 32, "n_gen": 0, "avg_ts": 1.0}]), "lacks a prefill test"),
])
def test_refuses_what_is_not_a_report(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_llama_bench(text)


def _fake_binary(tmp_path: pathlib.Path, body: str) -> pathlib.Path:
    script = tmp_path / "llama-bench"
    script.write_text(f"#!{sys.executable}\nimport sys, pathlib\n{body}\n")
    script.chmod(0o755)
    return script


def test_runs_the_binary_with_the_benchs_settings_and_measures_its_own_peak_rss(tmp_path):
    argv = tmp_path / "argv.json"
    binary = _fake_binary(tmp_path, f"import json\nblock = bytearray(300 * 2**20)\nblock[::4096] = b'x' * "
                                    f"len(block[::4096])\npathlib.Path({str(argv)!r}).write_text(json.dumps("
                                    f"sys.argv[1:]))\nprint(pathlib.Path({str(SAMPLE)!r}).read_text())")
    row = run_llama_bench(binary, "model.gguf", threads=2, prompt_tokens=512, new_tokens=64)
    assert json.loads(argv.read_text()) == ["-m", "model.gguf", "-t", "2", "-p", "512", "-n", "64", "-d", "0,512",
                                            "-r", "1", "-o", "json"]
    assert row["decode_tps"] == pytest.approx(18.673847)
    assert 300 < row["peak_rss_mb"] < 1000  # the child's 300 MiB, not this test process's


def test_the_childs_peak_rss_is_not_this_processs(tmp_path):
    import resource

    import torch  # noqa: F401  (this process: hundreds of MB, as a bench parent)

    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 150
    binary = _fake_binary(tmp_path, f"print(pathlib.Path({str(SAMPLE)!r}).read_text())")
    assert run_llama_bench(binary, "m.gguf", 2, 32, 8)["peak_rss_mb"] < 100  # a bare python: ~10-20 MB


def test_a_failing_or_missing_binary_is_a_typed_error(tmp_path):
    binary = _fake_binary(tmp_path, "print('loading', file=sys.stderr)\nprint('error: no model', file=sys.stderr)\n"
                                    "sys.exit(3)")
    with pytest.raises(ConfigError, match=r"exit 3\) on m.gguf: error: no model"):
        run_llama_bench(binary, "m.gguf", 2, 32, 8)
    with pytest.raises(ConfigError, match="--llama-bench .*nowhere: no such file"):
        run_llama_bench(tmp_path / "nowhere", "m.gguf", 2, 32, 8)


def test_gguf_type_reads_the_files_type(tmp_path):
    gguf = pytest.importorskip("gguf")
    for file_type, name in ((gguf.LlamaFileType.MOSTLY_Q8_0, "q8_0"), (gguf.LlamaFileType.MOSTLY_Q4_1, "q4_1")):
        writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), arch="llama")
        writer.add_file_type(int(file_type))
        for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.close):
            write()
        assert gguf_type(tmp_path / f"{name}.gguf") == name


def test_decode_table_puts_llamacpp_beside_lucidlm_and_names_failed_rows(monkeypatch, capsys):
    def child(args, engine, dtype):
        if (engine, dtype) == ("lucidlm", "q4_1"):
            return {"engine": engine, "dtype": dtype, "error": "q4_1: this lucidlm has no LLM.load(keep_quantized"}
        if engine == "runtime":
            return {"engine": engine, "dtype": dtype, "peak_rss_mb": 300.0}
        row = {"engine": engine, "dtype": dtype, "prefill_tps": 100.0, "decode_tps": 50.0, "peak_rss_mb": 400.0}
        if engine == "llama.cpp":
            return {**row, "decode_tps": 100.0, "file_mb": 138.0}
        return {**row, "batch_tps": 80.0, "tokens": [1, 2, 3], "warm_up_s": 1.0}

    monkeypatch.setattr(bench_decode, "_child", child)
    monkeypatch.setattr("lucidlm.bench.prepare_model", lambda model: None)
    monkeypatch.setattr(bench_decode, "gguf_files", lambda args: {"q8_0": pathlib.Path("q8.gguf"),
                                                                 "q4_1": pathlib.Path("q41.gguf")})
    args = _args(bench_decode, ["--rounds", "1", "--dtypes", "int8-float32,q4_1", "--llama-bench", "llama-bench",
                                "--model", "other.gguf"])
    assert bench_decode.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:2]): line for line in lines[3:] if line.split()[0] in
            ("runtime", "transformers", "llama.cpp", "lucidlm")}
    assert list(rows) == [("runtime", "torch+lucidlm"), ("transformers", "float32"), ("llama.cpp", "q8_0"),
                          ("llama.cpp", "q4_1"), ("lucidlm", "float32@q4_1"), ("lucidlm", "float32"),
                          ("lucidlm", "int8-float32"),
                          ("lucidlm", "q4_1")]
    assert rows[("lucidlm", "q4_1")].endswith("failed: q4_1: this lucidlm has no LLM.load(keep_quantized")
    assert "0.50x" in rows[("lucidlm", "int8-float32")].split()  # decode 50 / llama.cpp Q8_0's 100
    assert "138" in rows[("llama.cpp", "q4_1")].split() and "yes" in rows[("llama.cpp", "q4_1")].split()
    assert rows[("lucidlm", "int8-float32")].endswith("same as lucidlm float32")  # its greedy reference runs too
    assert any(line.startswith("fastest lucidlm decode: float32, 0.50x llama.cpp Q8_0") for line in lines)


def test_decode_refuses_an_unknown_row():
    args = argparse.Namespace(dtypes="float32,int4", llama_bench=None, files={}, model=None)
    with pytest.raises(ConfigError, match="'int4': expected rows from float32"):
        bench_decode.plan_rows(args)


def test_quant_ratio_targets():
    assert bench_quant.ratio_cells(10.2, 10.0, None, "int8-float32")[2] == "NO (within 1%)"
    assert bench_quant.ratio_cells(10.0, 10.0, 10.0, "q4_1") == ("1.0000", "1.0000", "4-bit: +0.0%")

"""``lucidlm bench export``: a row per GGUF type, each export reloaded and its greedy text compared."""

from __future__ import annotations

import re

from lucidlm.cli import main


def test_bench_export_prints_a_row_per_type(tiny_lm_dir, capsys):
    assert main(["bench", "export", "--model", str(tiny_lm_dir), "--types", "f32,q8_0", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    rows = {m[1]: m for m in re.finditer(r"^(\w+)\s+\|\s+([\d.]+) MB \|\s+([\d.]+) s \| (.+)$", out, re.M)}
    assert set(rows) == {"f32", "q8_0"}, out
    assert rows["f32"][4] == "yes"  # float32 written as float32: the same model
    # 8.5 bits a weight instead of 32 (the tokenizer's vocabulary and merges weigh the same in both)
    assert float(rows["q8_0"][2]) < float(rows["f32"][2]) * 0.6


def test_bench_export_refuses_an_unknown_type(capsys):
    assert main(["bench", "export", "--types", "q3_k"]) == 2
    assert "q3_k" in capsys.readouterr().err

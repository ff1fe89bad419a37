"""``lucidlm bench kv-bytes``: lucidlm's cache holds what transformers' holds, per token, for real configs."""

from __future__ import annotations

import argparse

import pytest
import torch

from lucidlm.bench import kv_bytes
from lucidlm.config import Config


@pytest.mark.parametrize("name", ["DeepSeek-V2-Lite", "Llama-3.2-1B", "Qwen3-30B-A3B"])
def test_cache_bytes_per_token_equal_transformers(name):
    config = Config.from_name(name)
    ours = kv_bytes.lucidlm_bytes(config, tokens=16, dtype=torch.bfloat16)
    assert ours["lucidlm"] == kv_bytes.transformers_bytes(name, tokens=16, dtype=torch.bfloat16)
    assert ours["positions"] == config.n_layer * 8  # one int64 position per slot and layer


def test_mla_full_keys_and_values_are_nine_times_the_latent():
    config = Config.from_name("DeepSeek-V2-Lite")
    assert kv_bytes.full_kv_bytes(config, torch.bfloat16) == 27 * 16 * (192 + 128) * 2
    assert kv_bytes.lucidlm_bytes(config, 8, torch.bfloat16)["lucidlm"] == 27 * (512 + 64) * 2


def test_the_table_and_a_bad_name(capsys):
    args = argparse.Namespace(models="Llama-3.2-1B", tokens=4, dtype="bfloat16")
    assert kv_bytes.run(args) == 0
    assert "| Llama-3.2-1B | GQA 32/8 | 32,768 | 128 | 32,768 | 32,768 | 1.0x |" in capsys.readouterr().out
    assert kv_bytes.run(argparse.Namespace(models="Llama-9", tokens=4, dtype="bfloat16")) == 2
    assert "unknown catalogue names ['Llama-9']" in capsys.readouterr().out

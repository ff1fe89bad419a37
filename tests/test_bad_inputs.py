"""The catalogue of bad inputs: each one fails with a typed lucidlm error naming what is wrong.

Every case builds its bad input (a corrupted copy of a tiny checkpoint, a bad argument, ...) and
asserts the error's type and a part of its message. No case may end in a non-lucidlm exception, a
hang or a partial output file.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from lucidlm import LLM
from lucidlm.errors import (CacheError, CheckpointError, ConfigError, ExplainError, GenerationError, GGUFError,
                            LucidError, TokenizerError)


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return LLM.load(tiny_lm_dir)


@pytest.fixture
def ckpt(tiny_lm_dir, tmp_path):
    """A private copy of the tiny checkpoint to corrupt."""
    return Path(shutil.copytree(tiny_lm_dir, tmp_path / "ckpt"))


def _edit_config(ckpt: Path, **changes) -> Path:
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


# ----------------------------------------------------------------------------- checkpoints
def _truncate(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _huge_header(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")


def _garbage_header(ckpt):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"\xff" * 16 + data[24:])


def _broken_index(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{not json")


def _index_missing_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))


def _integer_weights(ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name].to(torch.int32)
    save_file(state, str(ckpt / "model.safetensors"))


def _config_not_json(ckpt):
    (ckpt / "config.json").write_text("{")


def _no_config(ckpt):
    (ckpt / "config.json").unlink()


def _pickled_bin(ckpt):
    import pickle

    (ckpt / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))


CHECKPOINT_CASES = {
    "truncated safetensors": (_truncate, CheckpointError, "model.safetensors"),
    "safetensors header longer than the file": (_huge_header, CheckpointError, "model.safetensors"),
    "safetensors header garbage": (_garbage_header, CheckpointError, "model.safetensors"),
    "shard index not JSON": (_broken_index, CheckpointError, "index"),
    "integer weights where floats belong": (_integer_weights, CheckpointError, "dtype int32"),
    "shard index names a missing shard": (_index_missing_shard, CheckpointError, "model-00002.safetensors"),
    "config.json not JSON": (_config_not_json, LucidError, "config.json"),
    "no config.json": (_no_config, LucidError, "config.json"),
    "pickle-bearing .bin": (_pickled_bin, CheckpointError, "pytorch_model.bin"),
    "hidden_size of the wrong type": (lambda c: _edit_config(c, hidden_size="wide"), ConfigError, "n_embd='wide'"),
    "n_head that does not divide": (lambda c: _edit_config(c, num_attention_heads=5), ConfigError, "head"),
    "negative layer count": (lambda c: _edit_config(c, num_hidden_layers=-2), ConfigError, "layer"),
    "zero vocabulary": (lambda c: _edit_config(c, vocab_size=0), ConfigError, "vocab"),
    "kv heads that do not divide the heads": (lambda c: _edit_config(c, num_key_value_heads=3), ConfigError,
                                              "head"),
    "unknown architecture": (lambda c: _edit_config(c, architectures=["FrobnicatorForCausalLM"],
                                                    model_type="frobnicator"), ConfigError, "rob"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint(case, ckpt, capsys):
    corrupt, error, needle = CHECKPOINT_CASES[case]
    corrupt(ckpt)
    with pytest.raises(error) as caught:
        LLM.load(ckpt)
    assert needle.lower() in str(caught.value).lower(), str(caught.value)
    assert "executed" not in capsys.readouterr().out  # nothing was unpickled


def test_broken_tokenizer_json(ckpt):
    (ckpt / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        LLM.load(ckpt)


# ----------------------------------------------------------------------------- GGUF
def _gguf(tmp_path, data: bytes) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return path


GGUF_CASES = {
    "bad magic": (b"GGML" + b"\0" * 60, "not a GGUF file"),
    "unknown version": (b"GGUF" + struct.pack("<I", 99) + b"\0" * 16, "gguf"),
    "truncated header": (b"GGUF" + struct.pack("<I", 3), "gguf"),
    "huge tensor count": (b"GGUF" + struct.pack("<IQQ", 3, 2 ** 62, 0), "gguf"),
    "huge metadata count": (b"GGUF" + struct.pack("<IQQ", 3, 0, 2 ** 62), "gguf"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_bad_gguf(case, tmp_path):
    data, needle = GGUF_CASES[case]
    with pytest.raises(GGUFError) as caught:
        LLM.load(_gguf(tmp_path, data), cache_dir=tmp_path / "cache")
    assert needle.lower() in str(caught.value).lower() and "bad.gguf" in str(caught.value)
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_missing_gguf(tmp_path):
    with pytest.raises(LucidError, match="nowhere.gguf"):
        LLM.load(tmp_path / "nowhere.gguf", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- chat templates
TEMPLATES = {
    "raises": ("{{ raise_exception('no system role here') }}", "no system role here"),
    "reaches Python internals": ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "template"),
    "undefined filter": ("{{ messages | frobnicate }}", "template"),
    "syntax error": ("{% for m in messages %}", "template"),
    "huge loop": ("{% for i in range(10 ** 9) %}x{% endfor %}", "template"),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_bad_chat_template(case, tiny):
    template, needle = TEMPLATES[case]
    tok = tiny.tokenizer
    saved = tok.chat_template
    tok.chat_template = template
    try:
        with pytest.raises(TokenizerError) as caught:
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
    finally:
        tok.chat_template = saved
    assert needle.lower() in str(caught.value).lower(), str(caught.value)


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": 42}], "content"),
    ([{"content": "no role"}], "role"),
    ([{"role": "wizard", "content": "hi"}], "wizard"),
    (["just a string"], "message"),
    ([], "message"),
])
def test_bad_messages(tiny, messages, needle):
    with pytest.raises(LucidError) as caught:
        tiny.chat(messages, max_new_tokens=2)
    assert needle in str(caught.value).lower(), str(caught.value)


# ----------------------------------------------------------------------------- generation arguments
@pytest.mark.parametrize("kwargs, needle", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"kv_cache": "lru"}, "lru"),
    ({"kv_cache": "sink(n_sink=-1)", "cache_tokens": 32}, "n_sink"),
    ({"kv_cache": "h2o(recnet=4)", "cache_tokens": 32}, "recnet"),
    ({"kv_cache": "window", "cache_tokens": 0}, "cache_tokens"),
])
def test_bad_generation_arguments(tiny, kwargs, needle):
    with pytest.raises((GenerationError, CacheError)) as caught:
        tiny.generate("Hello there", **kwargs)
    assert needle in str(caught.value), str(caught.value)


def test_prompt_longer_than_the_context(tiny):
    with pytest.raises(CacheError, match="context"):
        tiny.generate("word " * 400, max_new_tokens=2)


def test_empty_prompts(tiny):
    with pytest.raises(ExplainError, match="no tokens"):
        tiny.explain([])
    if not tiny.tokenizer.encode(""):  # a tokenizer that adds no BOS: the empty text has no token
        with pytest.raises(GenerationError, match="at least one token"):
            tiny.generate([""], max_new_tokens=2)


def test_streaming_several_prompts(tiny):
    with pytest.raises(GenerationError, match="stream"):
        tiny.generate(["a", "b"], stream=True)


# ----------------------------------------------------------------------------- explanations
def test_explain_inside_inference_mode(tiny):
    with torch.inference_mode(), pytest.raises(ExplainError, match="inference_mode"):
        tiny.explain("Hello there")


def test_explain_batch_inside_inference_mode(tiny):
    from lucidlm.explain.batch import explain_batch

    with torch.inference_mode(), pytest.raises(ExplainError, match="inference_mode"):
        explain_batch(tiny.model, tiny.tokenizer, ["Hello", "there"])


@pytest.mark.parametrize("kwargs, needle", [
    ({"method": "shap"}, "method"),
    ({"target": 10 ** 9}, "vocab"),
    ({"target": -3}, "token id -3"),
    ({"method": "occlusion", "options": {"steps": 3}}, "steps"),
    ({"method": "integrated-gradients", "options": {"steps": 0}}, "steps"),
    ({"method": "attnlrp", "options": {"steps": 8}}, "options"),
])
def test_bad_explanation_arguments(tiny, kwargs, needle):
    with pytest.raises(ExplainError) as caught:
        tiny.explain("The capital of France is", **kwargs)
    assert needle in str(caught.value), str(caught.value)


def test_bad_dtype(tiny_lm_dir):
    with pytest.raises(ConfigError, match="dtype"):
        LLM.load(tiny_lm_dir, dtype="float8")


# ----------------------------------------------------------------------------- files
def test_explanation_json_into_a_missing_directory_writes_nothing(tiny, tmp_path):
    e = tiny.explain("Hello there")
    with pytest.raises(OSError):
        e.save_json(tmp_path / "no" / "such" / "dir" / "e.json")
    assert not (tmp_path / "no").exists()


def test_full_disk_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    import errno
    import os

    e = tiny.explain("Hello there")
    target = tmp_path / "e.json"

    def full(fd):  # the bytes went to the temporary file, then the disk is found full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        e.save_json(target)
    monkeypatch.undo()
    assert not target.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("argv, needle", [
    ([b"generate", b"caf\xe9 au lait"], b"not valid UTF-8"),
    ([b"explain", b"\xff\xfe"], b"not valid UTF-8"),
    ([b"explain", b"ok", b"--target", b"\xc3"], b"--target"),
    ([b"generate", b""], b"empty"),
    ([b"generate", b"hi", b"--max-new-tokens", b"0"], b"--max-new-tokens"),
    ([b"generate", b"hi", b"--temperature", b"-1"], b"--temperature"),
    ([b"generate", b"hi", b"--top-p", b"0"], b"--top-p"),
    ([b"generate", b"hi", b"--kv-cache", b"sink(n_sink=x)"], b"n_sink"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, needle):
    import subprocess
    import sys

    done = subprocess.run([sys.executable.encode(), b"-m", b"lucidlm", *argv], capture_output=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


def test_an_output_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    """/proc refuses new files even to root (a chmod-ed directory would not stop root)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lucidlm", "explain", "The capital of France is", "--json",
                           "/proc/lucidlm-e.json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "/proc/lucidlm-e.json" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not list(Path("/proc").glob("*lucidlm-e.json*"))


# ----------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("policy", [None, "window", "h2o", "snapkv(window=4)", "knorm", "sink+int8"])
def test_a_bfloat16_model_explains_with_every_method_under_every_policy(tiny_lm_dir, policy):
    from lucidlm.methods import EXPLAIN_METHODS, METHODS

    llm = LLM.load(tiny_lm_dir, dtype="bfloat16")
    prompt = "The capital of France is Paris and the capital of Italy is"
    for method in EXPLAIN_METHODS if policy is None else METHODS:  # baselines have no kv_cache path
        options = {"steps": 4} if method == "integrated-gradients" else None
        kwargs = {} if policy is None else {"kv_cache": policy, "cache_tokens": 8}
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # integrated gradients' completeness warning at 4 steps
            e = llm.explain(prompt, method=method, options=options, **kwargs)
        assert torch.isfinite(e.relevance).all(), (method, policy)
        assert len(e.relevance) == len(llm.tokenizer.encode(prompt))

"""Property-based fuzzing of everything that reads untrusted input: each mutated input either loads
or raises a lucidlm error; nothing else escapes, and no example runs past its deadline.

The CI profile runs a fixed, derandomised set of examples; ``LUCIDLM_FUZZ_EXAMPLES=2000`` (for
example) runs a long random campaign locally.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzers need the hypothesis package")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lucidlm.errors import LucidError  # noqa: E402

LONG = int(os.environ.get("LUCIDLM_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=LONG or 30, derandomize=not LONG, deadline=timedelta(seconds=20),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    from test_gguf import _write_tiny

    return _write_tiny(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


@pytest.fixture(scope="module")
def tiny_safetensors(tmp_path_factory) -> bytes:
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}, str(path))
    return path.read_bytes()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, window: int) -> bytes:
    out = bytearray(data)
    for offset, value in edits:
        out[offset % min(window, len(out))] = value
    return bytes(out[:cut] if cut is not None else out)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6)
cuts = st.one_of(st.none(), st.integers(0, 4096))


@FUZZ
@given(edits=edits, cut=cuts)
def test_mutated_gguf_loads_or_raises_a_lucidlm_error(tiny_gguf, edits, cut):
    from lucidlm.checkpoints.gguf import gguf_to_hf_dir

    data = _mutate(tiny_gguf, edits, cut, window=2048)  # the header and metadata live up front
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.gguf"
        path.write_bytes(data)
        try:
            gguf_to_hf_dir(path, cache_dir=Path(tmp) / "cache", progress=False)
        except LucidError:  # a failed conversion leaves no entry and no temporary directory behind
            cache = Path(tmp) / "cache"
            leftovers = sorted(cache.iterdir()) if cache.exists() else []
            assert not leftovers, leftovers


@FUZZ
@given(edits=edits, cut=cuts)
def test_mutated_safetensors_header_loads_or_raises(tiny_safetensors, edits, cut):
    from lucidlm.checkpoints.hf import read_tensors

    (header_len,) = struct.unpack("<Q", tiny_safetensors[:8])
    data = _mutate(tiny_safetensors, edits, cut, window=8 + header_len)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(data)
        try:
            read_tensors(path)
        except LucidError:
            pass


_values = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 40), 2 ** 40), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3))
_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
           "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim", "tie_word_embeddings",
           "rope_scaling", "hidden_act", "sliding_window", "attention_bias"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _values, min_size=1, max_size=4))
def test_random_config_values_build_or_raise(changes):
    from lucidlm.config import Config

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
          "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu", **changes}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf, default=str))
        try:
            config = Config.from_hf(Path(tmp))
        except LucidError:
            return
    c = config
    width = max(c.n_head * c.head_size, c.n_embd, c.intermediate_size or 0)
    if c.n_layer * width * width * 8 + c.vocab_size * c.n_embd < 1 << 22:  # build only what is small
        from lucidlm import GPT

        try:
            GPT(config)
        except LucidError:
            pass


_messages = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]),
                    st.one_of(st.text(max_size=12), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)),
                    max_size=4),
    st.text(max_size=5), st.integers()), max_size=4)


@FUZZ
@given(messages=_messages, generation_prompt=st.booleans())
def test_random_chat_messages_render_or_raise(ours, messages, generation_prompt):
    try:
        text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    except LucidError:
        return
    assert isinstance(text, str)

"""SentencePiece GGUF tokenizers (``tokenizer.ggml.model == "llama"``) vs transformers' GGUF loader.

Llama-2, Mistral, Gemma and Phi-3 GGUF files store a SentencePiece vocabulary: pieces spelled with
"▁" for a space, scores that rank the merges, the 256 byte tokens ``<0x00>``..``<0xFF>`` for byte
fallback, and no merges. transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` is
the oracle for both ``encode`` and ``decode``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest

from lucidlm import LLM
from lucidlm.checkpoints import gguf as lgguf
from lucidlm.errors import GGUFError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to read a GGUF config")

from test_gguf_families import CASES, Case, _gguf_tensors, _metadata, build_model  # noqa: E402

_UNK, _NORMAL, _CONTROL, _USER, _BYTE = 2, 1, 3, 4, 6  # llama.cpp token types

_WORDS = (
    "the quick brown fox jumps over lazy dog hello world this is a test of tokenizer with some words "
    "and numbers like 1234 or 2024 café naïve über straße it's don't can't let's go tokenization "
    "lucid model language spaces newline tab end"
).split()

TEXTS = [
    "Hello world",
    "hello world",
    " hello",
    "  hello   world  ",
    "the quick brown fox jumps over the lazy dog.",
    "Tokenization of 1234 and 2024!",
    "café naïve über straße",
    "line one\nline two\n\nend",
    "tab\tseparated\tvalues",
    "emoji 🦙🔥 and 中文字符",
    "it's don't can't",
    "   ",
    "x",
    "<s> literal specials </s> and <|im_end|> here",
    "think: <think>ok</think> done",
    "ÿ\u00a0non-breaking",
]


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """``<unk> <s> </s>``, 256 byte tokens, single characters, then every prefix of every "▁word"."""
    chars = sorted({c for w in _WORDS for c in w} | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:"))
    pieces: list[str] = []
    for word in _WORDS:
        for spelled in (f"\u2581{word}", word):
            for end in range(2, len(spelled) + 1):
                if spelled[:end] not in pieces:
                    pieces.append(spelled[:end])
    pieces += ["\u2581\u2581", "\u2581\u2581\u2581", "\u2581\u2581\u2581\u2581"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", *chars, *pieces]
    tokens += ["<|im_end|>", "<think>", "</think>"]
    n_bytes = 256
    scores = [0.0] * (3 + n_bytes)
    scores += [-1000.0 - i for i in range(1 + len(chars))]  # single characters merge nothing
    scores += [-float(i) - (3 * len(p)) for i, p in enumerate(pieces)]
    scores += [0.0, 0.0, 0.0]
    types = [_UNK, _CONTROL, _CONTROL, *[_BYTE] * n_bytes, *[_NORMAL] * (1 + len(chars) + len(pieces))]
    types += [_CONTROL, _USER, _USER]
    return tokens, scores, types


TOKENS, SCORES, TYPES = _vocabulary()


def write_spm_gguf(
    path: pathlib.Path,
    *,
    arch: str = "llama",
    tokenizer_model: str = "llama",
    drop: tuple[str, ...] = (),
    flags: dict[str, bool] | None = None,
) -> pathlib.Path:
    """A tiny Llama-2 style GGUF whose tokenizer is a SentencePiece vocabulary."""
    case = Case("llama2", "llama", dict(vocab_size=len(TOKENS)))
    model = build_model(case)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name("tiny spm")
    for key, value in _metadata(model.config, "llama").items():
        key = key.format(arch=arch)
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(TOKENS)
    if "scores" not in drop:
        writer.add_token_scores(SCORES)
    writer.add_token_types(TYPES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, value in (flags or {}).items():
        writer.add_bool(f"tokenizer.ggml.{name}", value)
    for name, value in _gguf_tensors(model, "llama").items():
        writer.add_tensor(name, value.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _oracle(path: pathlib.Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    """(our tokenizer, transformers' tokenizer) for the default file: no BOS/EOS flags, no merges."""
    folder = tmp_path_factory.mktemp("spm")
    path = write_spm_gguf(folder / "spm.gguf")
    return LLM.load(path, cache_dir=folder / "cache").tokenizer, _oracle(path)


def _assert_same(ours, oracle, texts=TEXTS) -> None:
    for text in texts:
        ids = oracle.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == oracle.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == oracle.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True), text


def test_encode_decode_equal_transformers(default_pair):
    _assert_same(*default_pair)


def test_byte_fallback_leading_and_repeated_spaces(default_pair):
    ours, _ = default_pair
    assert ours.encode("🦙", add_special_tokens=False) == [
        ours.token_to_id("\u2581"), *(ours.token_to_id(f"<0x{b:02X}>") for b in "🦙".encode())
    ]
    assert ours.encode("hello world", add_special_tokens=False) == [ours.token_to_id("\u2581hello"),
                                                                  ours.token_to_id("\u2581world")]
    assert ours.encode("  hello", add_special_tokens=False)[0] == ours.token_to_id("\u2581")
    # Metaspace prepends "▁" only when the text does not start with a space, and decode strips one:
    # " hello" comes back as "hello", in transformers too.
    for text in TEXTS:
        expected = text[1:] if text.startswith(" ") else text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == expected


def test_bos_added_by_default_like_llama_cpp(default_pair):
    ours, oracle = default_pair
    assert ours.encode("hello")[0] == 1 == oracle.encode("hello")[0]
    assert ours.encode("hello", add_special_tokens=False)[0] != 1


@pytest.mark.parametrize("flags", [dict(add_bos_token=False), dict(add_bos_token=True, add_eos_token=True),
                                   dict(add_space_prefix=False)], ids=["no-bos", "bos-eos", "no-space-prefix"])
def test_bos_eos_flags_equal_transformers(flags, tmp_path):
    path = write_spm_gguf(tmp_path / "spm.gguf", flags=flags)
    ours, oracle = LLM.load(path, cache_dir=tmp_path / "cache").tokenizer, _oracle(path)
    _assert_same(ours, oracle, TEXTS[:6])
    first = ours.encode("hello")[0]
    assert (first == 1) == flags.get("add_bos_token", True)
    assert (ours.encode("hello")[-1] == 2) == flags.get("add_eos_token", False)


def test_missing_scores_names_the_key(tmp_path):
    path = write_spm_gguf(tmp_path / "noscores.gguf", drop=("scores",))
    with pytest.raises(GGUFError, match=r"noscores\.gguf.*tokenizer\.ggml\.scores"):
        lgguf.gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=False)


def test_unknown_tokenizer_model_is_refused(tmp_path):
    path = write_spm_gguf(tmp_path / "bert.gguf", tokenizer_model="bert")
    with pytest.raises(GGUFError, match=r"bert\.gguf describes a 'bert' tokenizer; supported tokenizer models: gpt2, llama"):
        lgguf.gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=False)


def test_scores_of_wrong_length_are_refused():
    meta: dict[str, Any] = {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
                            "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.scores": SCORES[:-1]}
    with pytest.raises(GGUFError, match=r"x\.gguf.*'tokenizer\.ggml\.scores' has \d+ entries"):
        lgguf.build_tokenizer(meta, "x.gguf")


@pytest.mark.parametrize("arch", ["phi3", "gemma2", "gemma3"])
def test_architecture_specific_sentencepiece_equals_transformers(arch):
    """Phi-3 prepends "▁" with a normalizer; Gemma spells space runs as spaces and ranks merges by
    position. Compared backend to backend (transformers builds these from the architecture name)."""
    from transformers.integrations.gguf import convert_gguf_tokenizer

    tokens = [" " * len(t) if t and not t.strip("\u2581") and len(t) > 1 else t for t in TOKENS] if "gemma" in arch \
        else TOKENS
    meta = {"general.architecture": arch, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": SCORES, "tokenizer.ggml.token_type": TYPES,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    ours = lgguf.build_tokenizer(meta, f"{arch}.gguf")
    oracle, _ = convert_gguf_tokenizer(arch, {"tokenizer_type": "llama", "tokens": tokens, "scores": SCORES,
                                              "token_type": TYPES})
    for text in TEXTS:
        ids = oracle.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == oracle.decode(ids, skip_special_tokens=False), text

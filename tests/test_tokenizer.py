"""Tokenizer built from the embedded GGUF vs transformers' own GGUF tokenizer (the oracle)."""

from __future__ import annotations

import json

import pytest

from lucidlm.errors import TokenizerError
from lucidlm.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n",
    "Numbers: 3.14159, 1,000,000 and 42nd; 2024-06-01T12:00:00Z",
    "Emoji 🤖🚀 and accents: café, naïve, Zürich",
    "中文文本测试，日本語のテキスト、한국어",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    inner   spaces\tand\ttabs",
    "line one\nline two\n\n\nline five\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "<|endoftext|>text after eot<|im_end|>",
    "isn't it? I'm sure they've gone, we're here . , !",
    "URL https://example.com/a?b=c&d=e#frag and e-mail a.b@c.de",
    "",
    " ",
    "Ωμέγα русский текст עברית العربية",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, oracle, text):
    assert ours.encode(text) == oracle.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(ours, oracle, text):
    ids = oracle.encode(text)
    assert ours.decode(ids) == oracle.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)


def test_round_trip_is_lossless(ours):
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text


def test_special_tokens_and_vocab(ours, oracle):
    assert ours.vocab_size == len(oracle)
    assert ours.bos_id == oracle.bos_token_id == 1
    assert oracle.eos_token_id in ours.eos_ids
    assert ours.eos_ids == [2]
    assert ours.token_to_id("<|im_end|>") == 2
    assert ours.token_to_id("definitely-not-a-token") is None
    assert ours.id_to_token(2) == "<|im_end|>"
    assert ours.id_to_token(19556) == oracle.convert_ids_to_tokens(19556)
    with pytest.raises(TokenizerError):
        ours.id_to_token(10**9)
    assert ours.chat_template == oracle.chat_template
    # SmolLM2 adds no BOS to plain text
    assert ours.encode("Hello")[0] != ours.bos_id


@pytest.mark.parametrize("text", TEXTS[2:7])
def test_incremental_decoder_pieces_join_to_decode(ours, text):
    ids = ours.encode(text)
    decoder = IncrementalDecoder(ours)
    pieces = [decoder.feed(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == ours.decode(ids)
    # No piece may carry half a character
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_decoder_holds_back_split_characters(ours):
    # A single emoji is spread over several byte-level tokens; nothing is released until complete.
    ids = ours.encode("🤖")
    assert len(ids) > 1
    decoder = ours.incremental_decoder()
    assert [decoder.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.feed(ids[-1]) == "🤖"
    assert list(ours.incremental_decoder().stream(ours.encode("a🤖b"))) != []
    assert "".join(ours.incremental_decoder().stream(ours.encode("a🤖b"))) == "a🤖b"


def test_incremental_decoder_flushes_incomplete_tail(ours):
    ids = ours.encode("x🤖")[:-1]  # cut inside the emoji's bytes
    assert "".join(ours.incremental_decoder().stream(ids)) == ours.decode(ids)


def test_missing_tokenizer_json_names_dir(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_tokenizer_config_flags_rebuild_post_processor(converted, tmp_path):
    # A checkpoint whose tokenizer_config asks for BOS gets it, as transformers does.
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((converted / name).read_bytes())
    config = json.loads((converted / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello")[0] == tok.bos_id
    assert tok.encode("Hello", add_special_tokens=False)[0] != tok.bos_id

"""The tokenizer of a GGUF file: ``tokenizer.json`` (a ``tokenizers.Tokenizer`` equal to the one
transformers builds from the same metadata), ``tokenizer_config.json`` and
``generation_config.json``.

Byte-level BPE (``tokenizer.ggml.model = "gpt2"``) and SentencePiece (``"llama"``, rebuilt as BPE
with byte fallback) are supported.

>>> meta = {"tokenizer.ggml.tokens": ["<s>", "</s>", "hi"], "tokenizer.ggml.bos_token_id": 0,
...         "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.model": "llama"}
>>> special_ids(meta), tokenizer_config(meta)["add_bos_token"], tokenizer_config(meta)["eos_token"]
({'bos_token_id': 0, 'eos_token_id': 1}, True, '</s>')
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import GGUFError

SUPPORTED_TOKENIZERS = ("gpt2", "llama")

# Pre-tokenizer regexes for the GGUF ``tokenizer.ggml.pre`` values whose merges were not learned
# with GPT-2's split; the same table transformers uses. Unlisted values keep GPT-2's ByteLevel split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# gpt-oss's o200k split: case-aware words with their contractions, digits in threes
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **{name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")},
    "gpt-4o": _GPT4O_SPLIT,
}

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# transformers' name of each special id -> its GGUF key, ``tokenizer.ggml.<key>``
SPECIAL_ID_KEYS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "padding_token_id",
    "unk_token_id": "unknown_token_id",
}
SPACE = "\u2581"  # SentencePiece's spelling of a space ("▁")
# Architectures whose SentencePiece tokenizer differs from Llama's, as transformers rebuilds them.
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
    """``{"bos_token_id": 1, ...}``: the special token ids the GGUF names, as transformers calls them."""
    return {hf: int(meta[f"tokenizer.ggml.{g}"]) for hf, g in SPECIAL_ID_KEYS.items() if f"tokenizer.ggml.{g}" in meta}


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: the BOS, EOS and padding ids."""
    ids = special_ids(meta)
    return {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids}


def _special_tokens(meta: dict[str, Any]) -> dict[str, str]:
    """``{"bos_token": "<|im_start|>", ...}`` for the special ids the GGUF names."""
    tokens = meta.get("tokenizer.ggml.tokens", [])
    out = {}
    for hf, token_id in special_ids(meta).items():
        if 0 <= token_id < len(tokens):
            out[hf.removesuffix("_id")] = tokens[token_id]
    return out


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, BOS/EOS flags and the chat template."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _adds_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **_special_tokens(meta),
    }
    arch = meta.get("general.architecture")
    if (context := meta.get(f"{arch}.context_length")) is not None:
        config["model_max_length"] = context
    if (template := meta.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(meta: dict[str, Any], path: str | os.PathLike[str] = "<gguf>"):
    """A ``tokenizers.Tokenizer`` equal to the one transformers builds from GGUF metadata.

    Raises:
        GGUFError: the GGUF describes a tokenizer model other than byte-level BPE (``gpt2``) or
            SentencePiece (``llama``), or lacks a key that model needs.
    """
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise GGUFError(
            f"{path} describes a {kind!r} tokenizer; supported tokenizer models: {', '.join(SUPPORTED_TOKENIZERS)}"
        )
    tokens = [str(t) for t in _tokenizer_array(meta, "tokens", path)]
    if kind == "gpt2":
        tokenizer, keep = _byte_level_tokenizer(meta, tokens)
    else:
        tokenizer, keep = _sentencepiece_tokenizer(meta, tokens, path)
    types = list(meta.get("tokenizer.ggml.token_type", []))
    specials = [t for t, ty in zip(tokens, types) if ty == CONTROL and keep(t)]
    specials += [t for t in _special_tokens(meta).values() if t not in specials and keep(t)]
    # Without these, "<|im_start|>" in text would be cut into pieces instead of kept whole.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    tokenizer.post_processor = _post_processor(meta)
    return tokenizer


def _tokenizer_array(meta: dict[str, Any], name: str, path: str | os.PathLike[str]) -> list:
    """``tokenizer.ggml.<name>``, a list; GGUFError naming the file and key when absent or not a list."""
    key = f"tokenizer.ggml.{name}"
    if key not in meta:
        kind = meta.get("tokenizer.ggml.model")
        raise GGUFError(f"{path} lacks the metadata key {key!r}, which a {kind!r} tokenizer needs")
    value = meta[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise GGUFError(f"{path}: metadata key {key!r} is {type(value).__name__}; expected an array")
    return list(value)


def _byte_level_tokenizer(meta: dict[str, Any], tokens: list[str]):
    """GPT-2 style byte-level BPE, and which tokens may be added as specials (those in its alphabet)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens stored in plain UTF-8 (not in the byte alphabet) are respelled, as transformers does.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), pre_tokenizers, Regex)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, lambda token: set(token) <= alphabet


def _sentencepiece_tokenizer(meta: dict[str, Any], tokens: list[str], path: str | os.PathLike[str]):
    """SentencePiece as BPE with byte fallback (``<0x41>``), merges from the file or from the scores.

    Llama/Mistral: "▁" stands for a space and one is prepended to the text (Metaspace). Phi-3 prepends
    it with a normalizer instead. Gemma spells runs of spaces as real spaces, ranks merges by token
    order (its scores do not follow merge order) and prepends nothing.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    arch = meta.get("general.architecture")
    gemma = arch in GEMMA_ARCHS
    if gemma:
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = [-float(i) for i in range(len(tokens))]
    else:
        ranks = [float(s) for s in _tokenizer_array(meta, "scores", path)]
        if len(ranks) != len(tokens):
            raise GGUFError(
                f"{path}: metadata key 'tokenizer.ggml.scores' has {len(ranks)} entries for {len(tokens)} tokens"
            )
    vocab = {token: i for i, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_ranks(tokens, ranks, vocab)
    unk = _special_tokens(meta).get("unk_token", "<unk>") if gemma else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tokenizer.normalizer = normalizers.Replace(" ", SPACE)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif arch == "phi3":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        steps.append(decoders.Strip(content=" ", left=1))
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, lambda token: True


def _merges_from_ranks(tokens: list[str], ranks: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-ranked first (ties: longer left, then longer right piece, then the order found)."""
    found = []
    rank_of = dict(zip(tokens, ranks))  # a repeated token keeps its last rank, as a dict would
    for token, rank in rank_of.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found += [(rank, left, right) for left, right in pairs]
    found.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))
    return [(left, right) for _, left, right in found]


def _pre_tokenizer(pre: str | None, pre_tokenizers, Regex):
    split = _PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _post_processor(meta: dict[str, Any]):
    """BOS/EOS insertion as the GGUF's add_bos_token / add_eos_token flags ask."""
    from tokenizers import processors

    special = _special_tokens(meta)
    ids = special_ids(meta)
    bos = special.get("bos_token") if _adds_bos(meta) else None
    eos = special.get("eos_token") if meta.get("tokenizer.ggml.add_eos_token") else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    pairs = [(bos, ids["bos_token_id"])] if bos else []
    pairs += [(eos, ids["eos_token_id"])] if eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)


def _adds_bos(meta: dict[str, Any]) -> bool:
    """Whether encode() starts with BOS: the file's flag; SentencePiece vocabularies without one
    get BOS, as llama.cpp and transformers do."""
    default = meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))

"""A ``tokenizer.json`` as the ``tokenizer.*`` metadata llama.cpp's converter writes: the inverse of
:mod:`~.tokenizer`, which rebuilds the same tokenizer from those keys.

* byte-level BPE becomes ``tokenizer.ggml.model = "gpt2"``: the tokens in id order (holes as
  ``[PAD<id>]``, unused), their types, the merges, and ``tokenizer.ggml.pre``, the name llama.cpp
  gives the split that precedes the merges (found as its converter does, by hashing the ids of a
  fixed text, or else from the pre-tokenizer's shape);
* BPE with byte fallback (a SentencePiece model as ``tokenizers`` holds it) becomes ``"llama"``:
  tokens, types (``<0x41>`` byte tokens, the unknown token), and scores that rank the merges the way
  the merge list does (llama.cpp's SentencePiece tokenizer merges by score). The merges go along too,
  for readers that take them (transformers, lucidlm).

>>> _merge_scores(["a", "b", "ab", "abb", "zz"], ["a b", "ab b"])
[0.0, 0.0, -0.0, -1.0, -6.0]
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

from ...errors import ExportError
from .tokenizer import BYTE, CONTROL, GEMMA_ARCHS, NORMAL, SPECIAL_ID_KEYS, UNKNOWN, UNUSED, USER_DEFINED

# llama.cpp's converter hashes the ids of this text to name the pre-tokenizer (get_vocab_base_pre)
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# a few of its hashes: the tokenizers of the families lucidlm exports
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 to Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
}  # fmt: skip


def tokenizer_keys(directory: pathlib.Path, arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    """Every ``tokenizer.*`` key for the tokenizer files in ``directory`` (``tokenizer.json`` and
    ``tokenizer_config.json``, as :class:`lucidlm.tokenizer.Tokenizer` reads them); special ids the
    tokenizer does not name come from the model's ``config.json`` ``hf``, as llama.cpp's SpecialVocab
    takes them.

    Raises:
        ExportError: no ``tokenizer.json``, or a tokenizer model other than BPE.
    """
    from ...tokenizer import Tokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"no tokenizer.json in {directory}: a GGUF file must carry its tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: a {model.get('type')!r} tokenizer cannot be exported to GGUF; "
                          "supported: BPE (byte-level, or SentencePiece with byte fallback)")
    wrapped = Tokenizer.from_dir(directory)
    tokens, types = _tokens(data, hf.get("vocab_size") or 0)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    keys: dict[str, Any]
    if model.get("byte_fallback"):
        types = [_spm_type(token, kind, model.get("unk_token")) for token, kind in zip(tokens, types)]
        keys = {"model": "llama", "pre": "default", "tokens": tokens, "scores": _merge_scores(tokens, merges),
                "token_type": types, "merges": merges}
        if arch in GEMMA_ARCHS:
            keys["add_space_prefix"] = False
    else:
        keys = {"model": "gpt2", "pre": _pre_tokenizer(data, wrapped, path), "tokens": tokens, "token_type": types,
                "merges": merges}
    keys |= _special_keys(wrapped, hf, len(tokens))
    out = {f"tokenizer.ggml.{k}": v for k, v in keys.items()}
    if wrapped.chat_template:
        out["tokenizer.chat_template"] = wrapped.chat_template
    return out


def _tokens(data: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id, and llama.cpp's types: added specials CONTROL, other added USER_DEFINED."""
    vocab: dict[str, int] = data["model"]["vocab"]
    added = data.get("added_tokens", [])
    size = max([vocab_size, *(i + 1 for i in vocab.values()), *(a["id"] + 1 for a in added)])
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for entry in added:
        tokens[entry["id"]] = entry["content"]
        types[entry["id"]] = CONTROL if entry.get("special") else USER_DEFINED
    return tokens, types


def _spm_type(token: str, kind: int, unk: str | None) -> int:
    if token == unk:
        return UNKNOWN
    if kind == NORMAL and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return BYTE
    return kind


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that rank each token by the first merge that makes it (0 for tokens no
    merge makes that are one character, below every merge for longer ones no merge reaches)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    floor = len(merges)
    return [-float(rank[t]) if t in rank else (0.0 if len(t) <= 1 else -float(floor + i)) for i, t in enumerate(tokens)]


def _pre_tokenizer(data: dict[str, Any], wrapped, path: pathlib.Path) -> str:
    """``tokenizer.ggml.pre``: llama.cpp's name for the split before the merges."""
    digest = hashlib.sha256(str(wrapped.encode(_CHECK_TEXT)).encode()).hexdigest()
    if digest in _PRE_BY_HASH:
        return _PRE_BY_HASH[digest]
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise ExportError(f"{path}: llama.cpp has no name for this pre-tokenizer (ids of its check text hash to "
                      f"{digest}); supported: {', '.join(sorted(set(_PRE_BY_HASH.values())))}")


def _special_keys(wrapped, hf: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    """Special token ids and whether encode() adds BOS/EOS (what llama.cpp's SpecialVocab writes)."""
    keys: dict[str, Any] = {}
    for name, gguf_key in SPECIAL_ID_KEYS.items():
        token = wrapped.special_tokens.get(name.removesuffix("_id"))
        token_id = wrapped.token_to_id(token) if token else None
        if name == "bos_token_id" and wrapped.bos_id is not None:
            token_id = wrapped.bos_id
        if name == "eos_token_id" and wrapped.eos_ids:
            token_id = wrapped.eos_ids[0]
        fallback = hf.get(name)
        if token_id is None and isinstance(fallback, int) and 0 <= fallback < n_tokens:
            token_id = fallback
        if token_id is not None:
            keys[gguf_key] = int(token_id)
    ids = wrapped.encode("a")
    keys["add_bos_token"] = "bos_token_id" in keys and ids[:1] == [keys["bos_token_id"]]
    keys["add_eos_token"] = "eos_token_id" in keys and ids[-1:] == [keys["eos_token_id"]]
    return keys

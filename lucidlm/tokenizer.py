"""Tokenizer: a thin wrapper over ``tokenizers.Tokenizer`` that behaves like transformers'.

``encode``/``decode`` return what ``transformers.AutoTokenizer`` returns for the same checkpoint,
special tokens and stop ids come from the checkpoint's own config files, and chat prompts are
rendered with the checkpoint's chat template (see :mod:`lucidlm.chat`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

from lucidlm.chat import render_chat
from lucidlm.errors import TokenizerError
from lucidlm.fileio import read_json

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Encode, decode and chat-format text for one checkpoint."""

    def __init__(
        self,
        backend: Any,
        *,
        special_tokens: dict[str, str] | None = None,
        eos_ids: Iterable[int] = (),
        bos_id: int | None = None,
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        name: str = "tokenizer",
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer``; most callers want :meth:`from_dir` instead."""
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.name = name
        self._clean_up = clean_up_tokenization_spaces
        self.bos_id = bos_id if bos_id is not None else self._special_id("bos_token")
        self.eos_ids = _unique([*_as_list(self._special_id("eos_token")), *eos_ids])

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` plus the special tokens and chat template next to it.

        Raises:
            TokenizerError: the directory has no ``tokenizer.json`` or it cannot be parsed.
        """
        from tokenizers import Tokenizer as Backend

        folder = pathlib.Path(path).expanduser()
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"No tokenizer.json in {folder}: cannot build a tokenizer for this checkpoint")
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise TokenizerError(f"{tokenizer_file} is not a valid tokenizers file: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        specials = {n: t for n in _SPECIAL_NAMES if (t := _token_content(config.get(n))) is not None}
        _sync_post_processor(backend, config, specials)
        model_config = _read_json(folder / "config.json")
        generation = _read_json(folder / "generation_config.json") or model_config
        return cls(
            backend,
            special_tokens=specials,
            eos_ids=_as_list(generation.get("eos_token_id")),
            bos_id=_lookup(backend, specials.get("bos_token"), model_config.get("bos_token_id")),
            chat_template=_chat_template(folder, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name=str(folder),
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``, with the checkpoint's default BOS/EOS handling."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``, equal to transformers' ``tokenizer.decode``."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # transformers skips this clean-up for BPE models because it corrupts their output
        if self._clean_up and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` (a vocabulary string), or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """Vocabulary string of ``token_id``.

        Raises:
            TokenizerError: the id is outside the vocabulary.
        """
        token = self.backend.id_to_token(int(token_id))
        if token is None:
            raise TokenizerError(f"Token id {token_id} is not in the vocabulary of {self.name} (size {self.vocab_size})")
        return token

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-sequence token string, if the checkpoint has one."""
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """End-of-sequence token string, if the checkpoint has one."""
        return self.special_tokens.get("eos_token")

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` with the checkpoint's chat template (see :func:`lucidlm.chat.render_chat`)."""
        variables = {**self.special_tokens, **kwargs}
        return render_chat(
            self.chat_template, messages, add_generation_prompt, checkpoint=self.name, **variables
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template already wrote any BOS, so none is added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh :class:`IncrementalDecoder` for streaming generation."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


class IncrementalDecoder:
    """Turn a stream of ids into text pieces whose concatenation equals ``decode(all ids)``.

    A piece is released only once its text is final: a multi-byte character split across tokens
    decodes to U+FFFD until its last byte arrives, so such text is held back. Each step decodes a
    short window of recent ids (not the whole history), with the tokens before it as context so
    decoders that treat the first token specially (e.g. leading-space stripping) stay consistent.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this index have been released as text
        self._released: list[str] = []

    def feed(self, token_id: int) -> str:
        """Add one id; return the newly final text (often ``""``)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._released.append(piece)
        return piece

    def flush(self) -> str:
        """Release whatever is held back (end of stream); the pieces now join to ``decode(all)``."""
        full = self._decode(self._ids)
        released = "".join(self._released)
        # Byte-level and SentencePiece decoders only ever append, so ``full`` extends ``released``.
        rest = full[len(released) :] if full.startswith(released) else ""
        self._prefix = self._read = len(self._ids)
        if rest:
            self._released.append(rest)
        return rest

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Feed ``ids`` and yield each non-empty piece, flushing at the end."""
        for token_id in ids:
            if piece := self.feed(token_id):
                yield piece
        if rest := self.flush():
            yield rest

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._released)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


# ---------------------------------------------------------------------- helpers


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return read_json(path, TokenizerError) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def _lookup(backend: Any, token: str | None, fallback: int | None) -> int | None:
    token_id = backend.token_to_id(token) if token is not None else None
    return token_id if token_id is not None else fallback


def _chat_template(folder: pathlib.Path, config: dict[str, Any]) -> str | None:
    """The default template: from tokenizer_config.json, else ``chat_template.jinja`` (transformers v5)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _sync_post_processor(backend: Any, config: dict[str, Any], specials: dict[str, str]) -> None:
    """Rebuild BOS/EOS insertion when tokenizer_config.json states it, as transformers v5 does."""
    from tokenizers import processors

    explicit = "add_bos_token" in config or "add_eos_token" in config
    if not explicit and backend.post_processor is not None:
        return
    parts = []
    for flag, name in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
        token = specials.get(name)
        token_id = backend.token_to_id(token) if token is not None else None
        parts.append((token, token_id) if config.get(flag) and token_id is not None else None)
    bos, eos = parts
    single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[p for p in (bos, eos) if p]
    )


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop spaces before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(before, after)
    return text

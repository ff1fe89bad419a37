"""Relevance of words, character spans and documents, gathered from token relevances.

Every aggregation here only regroups tokens: each token lands in exactly one group, so with
``agg="sum"`` the groups' relevances add up to the tokens' (the explanation's total is conserved).

**The text and its offsets.** An explanation's tokens are display strings (``" France"``), not
always a faithful spelling of the prompt: SentencePiece tokenizers (Llama, Mistral, Gemma) decode a
lone token without its leading space (``"▁world"`` shows as ``"world"``), a character split across
byte tokens shows as ``"\\ufffd"`` in each of them, and the tokenizer may add tokens the prompt does
not contain (BOS ``"<s>"``). :func:`align` therefore matches the tokens against the prompt, when
the explanation has one, and gives each token its character range ``[start, end)`` in it:

* a token may take one space the display dropped (SentencePiece decodes a lone token without it),
  and may spell ``"▁"`` for a space (raw SentencePiece pieces; a leading one may also stand for
  nothing: the prefix space SentencePiece adds to the text);
* each run of ``"\\ufffd"`` stands for one character (the token holding its first byte) or for
  none (the token holding its other bytes, which then has an empty range); in a run of tokens
  that show nothing else, the characters are shared out by their UTF-8 length: exact for byte
  tokens (SentencePiece byte fallback), an estimate for byte-level BPE;
* a special token (``<...>`` such as ``"<s>"``, ``"<|im_start|>"``, or ``[CLS]``-style) the prompt
  does not contain takes no characters.

The text is then the prompt itself: character offsets are offsets into the prompt string, the
same whether or not the tokenizer added a BOS token. Tokens after the prompt (the generated tokens
of :meth:`~lucidlm.explain.explanation.GenerationExplanation.row`) are appended to it as they
display. When the tokens cannot be matched to the prompt (another normaliser, or no prompt: the
explanation was made from token ids), the text is the concatenated token strings (``"▁"`` read as
a space), special tokens included.

>>> a = align(["<s>", "", "Hello", "world", "", "\\ufffd", "\\ufffd"], "Hello world é")
>>> a.text, a.offsets
('Hello world é', [(0, 0), (0, 0), (0, 5), (5, 11), (11, 12), (12, 13), (13, 13)])
>>> a.pieces
['<s>', '', 'Hello', ' world', ' ', 'é', '']
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ..errors import ExplainError

__all__ = ["AGGREGATIONS", "OTHER", "Alignment", "aggregate", "align", "assign", "check_spans",
           "context_prompt", "span_groups", "word_groups"]

#: the ways to turn the relevances of a group of tokens into one number
AGGREGATIONS = ("sum", "mean", "max", "absmax")
#: the key :meth:`Explanation.context` gives to the tokens outside every segment
OTHER = "other"

_LOSSY = "\ufffd"  # what a decoder shows for the bytes of an incomplete character
_SPECIAL = re.compile(r"<[^<>\s]{1,40}>|\[[A-Z_]{2,12}\]")  # <s>, </s>, <|im_start|>, [CLS]
_PARTS = re.compile("\ufffd+|[^\ufffd]+")  # a token's runs of lost bytes and of plain text


class Alignment(NamedTuple):
    """Tokens matched to a text: ``offsets[i]`` is token i's ``[start, end)`` in ``text``,
    ``pieces[i]`` its characters there (a special token the text lacks: its display string),
    ``special[i]`` whether it is a special token, ``lossy[i]`` whether its display held
    ``"\\ufffd"`` (a byte of a split character)."""

    text: str
    offsets: list[tuple[int, int]]
    pieces: list[str]
    special: list[bool]
    lossy: list[bool]


# ----------------------------------------------------------------------------- alignment


def align(tokens: Sequence[str], prompt: str | None = None) -> Alignment:
    """Character range of each token in ``prompt`` (see the module docstring for the rules);
    without a prompt, or when the tokens do not spell it, in the concatenated tokens.

    >>> align([" a", "b"]).offsets, align(["\\u2581a"], "a").offsets
    ([(0, 2), (2, 3)], [(0, 1)])
    """
    tokens = [str(t) for t in tokens]
    special = [bool(_SPECIAL.fullmatch(t)) for t in tokens]
    lossy = [_LOSSY in t for t in tokens]
    offsets: list[tuple[int, int]] = []
    text = ""
    if prompt is not None:
        matched = _match_prompt(tokens, special, prompt)
        if matched:
            offsets, text = _share_split_characters(tokens, matched, prompt), prompt
    for t in tokens[len(offsets):]:  # unmatched tokens: as they display
        piece = t.replace("\u2581", " ")
        offsets.append((len(text), len(text) + len(piece)))
        text += piece
    pieces = [text[s:e] if e > s or not sp else t
              for (s, e), t, sp in zip(offsets, tokens, special)]
    return Alignment(text, offsets, pieces, special, lossy)


def _match_prompt(tokens: list[str], special: list[bool], text: str) -> list[tuple[int, int]]:
    """Offsets of the longest run of leading tokens that spells all of ``text`` (all tokens when
    they do), or ``[]``. A dynamic programme over (token, cursor): each layer maps a cursor to the
    cursor it came from."""
    layers: list[dict[int, int]] = []
    frontier: dict[int, int] = {0: 0}
    best = 0 if not text else -1  # how many tokens spell the whole text
    for token, is_special in zip(tokens, special):
        nxt: dict[int, int] = {}
        # furthest cursor first: of two ways to a cursor, keep the one whose earlier tokens took
        # more characters (the first byte of a split character owns it)
        for c in sorted(frontier, reverse=True):
            for e in _ends(token, is_special, text, c):
                nxt.setdefault(e, c)
        if not nxt:
            break
        layers.append(nxt)
        frontier = nxt
        if len(text) in nxt:
            best = len(layers)
    if best <= 0:
        return []
    offsets, cursor = [], len(text)
    for layer in reversed(layers[:best]):
        offsets.append((layer[cursor], cursor))
        cursor = layer[cursor]
    return offsets[::-1]


def _share_split_characters(tokens: list[str], offsets: list[tuple[int, int]],
                            text: str) -> list[tuple[int, int]]:
    """Within each run of tokens that show only ``"\ufffd"`` (after a leading space), give each
    character to the token holding its first byte, assuming the run's bytes are spread evenly:
    exact for one byte a token (SentencePiece byte fallback), an estimate otherwise (byte-level
    BPE tokens hold one to three bytes of a character and show the same)."""
    offsets = list(offsets)
    lossy_only = [bool(t.strip(" \u2581")) and not t.strip(" \u2581").strip(_LOSSY) for t in tokens]
    i = 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and lossy_only[j]:
            j += 1
        chars = text[offsets[i][0]:offsets[j - 1][1]].lstrip() if j > i else ""
        if j - i > 1 and all(ord(ch) > 0x7F for ch in chars):
            offsets[i:j] = _share(offsets[i][0], offsets[j - 1][1], j - i, text)
        i = j + 1
    return offsets


def _share(start: int, end: int, k: int, text: str) -> list[tuple[int, int]]:
    """Offsets of ``k`` byte-holding tokens that together spell ``text[start:end]``."""
    lead = start + len(text[start:end]) - len(text[start:end].lstrip())
    chars = text[lead:end]
    sizes = [len(ch.encode("utf-8", "surrogatepass")) for ch in chars]
    total, before, owners = sum(sizes), 0, []
    for size in sizes:
        owners.append(min(k - 1, -(-k * before // total)))  # rounded up: a head often holds 2 bytes
        before += size
    bounds = [lead + sum(o < t for o in owners) for t in range(k)] + [end]
    bounds[0] = start  # the first token keeps the leading space
    return list(itertools.pairwise(bounds))


def _ends(token: str, is_special: bool, text: str, c: int) -> list[int]:
    """Cursors where ``token`` can end when it starts at ``c``, the likeliest first."""
    ends = _spell(token, text, c)
    if text.startswith(" ", c) and not token.startswith(_LOSSY):
        # SentencePiece decodes a lone token without its leading space (a byte token has none)
        ends += [e for e in _spell(token, text, c + 1) if e > c + 1 or not token]
    if token.startswith("\u2581"):  # a raw SentencePiece piece: its "▁" may be the dummy prefix
        ends += _spell(token[1:], text, c)
    if is_special:  # added by the tokenizer (BOS, EOS): no character of the text
        ends.append(c)
    return ends


def _spell(token: str, text: str, c: int) -> list[int]:
    """Cursors where ``token`` can end when it starts at ``text[c]``: literal parts match
    exactly ("▁" also a space), each run of "\ufffd" one non-ASCII character or none."""
    ends = [c]
    for part in _PARTS.findall(token):
        nxt = []
        for p in ends:
            if part[0] == _LOSSY:  # the first byte(s) of a character own it; later bytes spell nothing
                nxt += [p + 1, p] if p < len(text) and ord(text[p]) > 0x7F else [p]
            elif _spells(part, text, p):
                nxt.append(p + len(part))
        ends = list(dict.fromkeys(nxt))
    return ends


def _spells(part: str, text: str, p: int) -> bool:
    if text.startswith(part, p):
        return True
    window = text[p:p + len(part)]
    return len(window) == len(part) and all(a == b or (a == "\u2581" and b == " ")
                                            for a, b in zip(part, window))


# ----------------------------------------------------------------------------- words


def _kind(piece: str, special: bool) -> str:
    """special, empty, newline, space, punct (Unicode punctuation only) or word."""
    if special:
        return "special"
    if not piece:
        return "empty"
    if piece.isspace():
        return "newline" if "\n" in piece or "\r" in piece else "space"
    if all(unicodedata.category(ch).startswith("P") for ch in piece.strip()):
        return "punct"
    return "word"


def word_groups(a: Alignment) -> list[list[int]]:
    """Token indices of each word, in order (every token in exactly one word).

    Rules, on each token's characters (its piece of the text):

    * a special token, a line break (whitespace with a newline) and a punctuation-only piece are
      words of their own;
    * a piece starting with whitespace starts a new word; so does a piece after one that ends
      in whitespace, except that a piece of spaces only is the leading space of the word after it
      (``" "`` then ``"1"`` is the word ``" 1"``);
    * a piece with no characters (the later bytes of a split character) stays with the word
      before it; an empty piece that is no such byte (SentencePiece's lone ``"▁"`` at the start)
      goes with the word after it.

    >>> a = align(["<s>", "Z", "ü", "rich", " na", "\\ufffd", "\\ufffd", ",", " ", "1"])
    >>> [[a.pieces[i] for i in w] for w in word_groups(a)]
    [['<s>'], ['Z', 'ü', 'rich'], [' na', '\\ufffd', '\\ufffd'], [','], [' ', '1']]
    """
    words: list[list[int]] = []
    pending: list[int] = []  # empty pieces waiting for the next word
    state = "closed"  # "open": the next piece may continue the word; "lead": a spaces-only word
    for i, piece in enumerate(a.pieces):
        kind = _kind(piece, a.special[i])
        if kind == "empty":
            (words[-1] if a.lossy[i] and words and not pending else pending).append(i)
            continue
        joins = (kind == "punct" and state == "lead" and not piece[0].isspace()) or \
                (kind == "word" and state != "closed" and not piece[0].isspace())
        if joins:
            words[-1] += [*pending, i]
        else:
            words.append([*pending, i])
        pending = []
        state = {"space": "lead", "word": "closed" if piece[-1].isspace() else "open"}.get(kind, "closed")
    if pending:  # trailing empty pieces: with the last word
        if words:
            words[-1] += pending
        else:
            words.append(pending)
    return words


# ----------------------------------------------------------------------------- spans


def check_spans(spans: Any, n_chars: int) -> list[dict[str, Any]]:
    """Spans as ``[{"label", "start", "end"}, ...]``, checked against a text of ``n_chars``
    characters: ``[(start, end), ...]`` (labelled ``"span 0"``, ...), ``{label: (start, end)}``
    or a list of such dicts. ExplainError names a span that is out of range, overlaps another,
    or is labelled twice or ``"other"``.

    >>> check_spans({"name": (0, 4)}, 10)
    [{'label': 'name', 'start': 0, 'end': 4}]
    >>> check_spans([(0, 4), (3, 6)], 10)
    Traceback (most recent call last):
    ...
    lucidlm.errors.ExplainError: spans 'span 0' (0, 4) and 'span 1' (3, 6) overlap
    """
    items = list(spans.items()) if isinstance(spans, Mapping) else list(enumerate(spans))
    out = [_check_span(label, value, n_chars) for label, value in items]
    labels = [s["label"] for s in out]
    for label in labels:
        if label == OTHER or labels.count(label) > 1:
            why = "is reserved for the text outside every span" if label == OTHER else "is used twice"
            raise ExplainError(f"span label {label!r} {why}")
    ordered = sorted(out, key=lambda s: (s["start"], s["end"]))
    for x, y in itertools.pairwise(ordered):
        if y["start"] < x["end"]:
            raise ExplainError(f"spans {_name(x)} and {_name(y)} overlap")
    return out


def _check_span(label: Any, value: Any, n_chars: int) -> dict[str, Any]:
    if isinstance(value, Mapping):
        label, value = value.get("label", label), (value.get("start"), value.get("end"))
    label = f"span {label}" if isinstance(label, int) else str(label)
    try:
        start, end = value
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ExplainError(f"span {label!r} = {value!r}: expected a pair of ints (start, end)")
    if not 0 <= start <= end <= n_chars:
        raise ExplainError(f"span {label!r} ({start}, {end}): expected 0 <= start <= end <= "
                           f"{n_chars} (the length of the explanation's text)")
    return {"label": label, "start": start, "end": end}


def _name(span: dict[str, Any]) -> str:
    return f"{span['label']!r} ({span['start']}, {span['end']})"


def assign(a: Alignment, spans: Sequence[dict[str, Any]]) -> list[int | None]:
    """For each token, the index in ``spans`` (checked, non-overlapping) of the span holding its
    first non-space character (its first character if it is all whitespace), or None.

    A token with no characters goes with the token before it when it is a later byte of a split
    character or sits at the end of the text, else with the character at its position; a special
    token the text lacks (BOS) is outside every span.

    >>> a = align(["<s>", "Paris", " is", " nice"], "Paris is nice")
    >>> assign(a, [{"label": "x", "start": 6, "end": 8}])
    [None, None, 0, None]
    """
    order = sorted(range(len(spans)), key=lambda k: spans[k]["start"])
    starts = [spans[k]["start"] for k in order]
    result: list[int | None] = []
    for i, (s, e) in enumerate(a.offsets):
        if e == s and not a.special[i] and result and (a.lossy[i] or s >= len(a.text)):
            result.append(result[-1])
            continue
        anchor = _anchor(a, i)
        k = bisect.bisect_right(starts, anchor) - 1 if anchor is not None else -1
        inside = k >= 0 and anchor < spans[order[k]]["end"]
        result.append(order[k] if inside else None)
    return result


def _anchor(a: Alignment, i: int) -> int | None:
    """The character that decides token i's span: its first non-space one, else its first."""
    s, e = a.offsets[i]
    if e > s:
        text = a.text[s:e]
        return s + (len(text) - len(text.lstrip()) if text.strip() else 0)
    return None if a.special[i] or s >= len(a.text) else s


def span_groups(a: Alignment, spans: Sequence[dict[str, Any]]) -> tuple[list[list[int]], list[int | None]]:
    """Runs of consecutive tokens in the same span (or outside all), and the span of each run
    (None outside). A special token outside every span is a run of its own (BOS stays apart).

    >>> a = align(["<s>", "a", " b", " c"], "a b c")
    >>> span_groups(a, [{"label": "b", "start": 1, "end": 3}])
    ([[0], [1], [2], [3]], [None, None, 0, None])
    """
    groups: list[list[int]] = []
    owners: list[int | None] = []
    for i, key in enumerate(assign(a, spans)):
        apart = key is None and (a.special[i] or a.special[groups[-1][-1]]) if groups else True
        if apart or owners[-1] != key:
            groups.append([i])
            owners.append(key)
        else:
            groups[-1].append(i)
    return groups, owners


# ----------------------------------------------------------------------------- numbers


def aggregate(relevance: torch.Tensor, groups: Sequence[Sequence[int]], agg: str = "sum",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One value per group, computed in float64 and returned as ``dtype``: ``sum``, ``mean``,
    ``max`` or ``absmax`` (the value of largest magnitude, sign kept; the first of equal ones).
    An empty group gives 0 for ``sum`` and NaN otherwise.

    >>> r = torch.tensor([1.0, -3.0, 2.0])
    >>> [aggregate(r, [[0, 1, 2], [2]], a).tolist() for a in AGGREGATIONS]
    [[0.0, 2.0], [0.0, 2.0], [2.0, 2.0], [-3.0, 2.0]]
    """
    if agg not in AGGREGATIONS:
        raise ExplainError(f"agg={agg!r}: expected one of {', '.join(AGGREGATIONS)}")
    values = relevance.detach().double().cpu()
    out = [_one(values[list(g)], agg) for g in groups]
    return torch.tensor(out, dtype=dtype)


def _one(v: torch.Tensor, agg: str) -> float:
    if not len(v):
        return 0.0 if agg == "sum" else math.nan
    if agg == "absmax":
        return float(v[int(v.abs().argmax())])
    return float({"sum": v.sum, "mean": v.mean, "max": v.max}[agg]())


# ----------------------------------------------------------------------------- context (RAG)


def context_prompt(documents: Sequence[str], question: str) -> tuple[str, list[dict[str, Any]]]:
    """The prompt for ``question`` asked about ``documents``, and each one's segment.

    Layout: ``"Document 1: <doc 1>\\n\\nDocument 2: <doc 2>\\n\\n<question>"``. The segments are
    ``{"label": "Document i", "start", "end"}`` for each document's own text (its header and the
    blank lines are outside them) and ``{"label": "question", ...}`` for ``question``.

    >>> text, segments = context_prompt(["Paris is in France."], "Where is Paris?")
    >>> text
    'Document 1: Paris is in France.\\n\\nWhere is Paris?'
    >>> [(s["label"], text[s["start"]:s["end"]]) for s in segments]
    [('Document 1', 'Paris is in France.'), ('question', 'Where is Paris?')]
    """
    if isinstance(documents, str) or not isinstance(documents, Sequence) \
            or not all(isinstance(d, str) for d in documents):
        raise ExplainError(f"context: expected a list of document strings, got {documents!r:.60}")
    if not isinstance(question, str):
        raise ExplainError("context= needs a text prompt (the question), not token ids")
    text, segments = "", []
    for n, document in enumerate(documents, 1):
        text += f"Document {n}: "
        segments.append({"label": f"Document {n}", "start": len(text), "end": len(text) + len(document)})
        text += document + "\n\n"
    segments.append({"label": "question", "start": len(text), "end": len(text) + len(question)})
    return text + question, segments

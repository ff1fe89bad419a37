"""Training data: records in, token sequences with a loss mask out.

Three record formats, detected per record:

* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the checkpoint's own
  chat template; the loss counts the assistant turns (their text and the template's end-of-turn
  marker), nothing else;
* instruction (Alpaca): ``{"instruction": ..., "input": ..., "output": ...}``; the loss counts
  ``output`` and the end-of-sequence token. With a chat template the record becomes a user turn
  and an assistant turn; without one it uses the Alpaca prompt;
* plain text: ``{"text": ...}``; every token counts, and texts are packed end to end (EOS between
  documents) into windows of ``max_seq_length`` tokens.

Sequences longer than ``max_seq_length`` are **truncated with a warning** naming the record (an
example whose answer is cut away entirely is an error instead).

>>> from lucidlm.train.data import detect_format
>>> detect_format({"messages": []}), detect_format({"instruction": "x", "output": "y"}), detect_format({"text": "t"})
('chat', 'instruction', 'text')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import DataError
from .names import PROMPT_STYLES
from ..records import Record, read_records  # noqa: F401  (read_records: part of this module's API)

IGNORE = -100  # label of a token the loss does not count (torch's cross_entropy ignore_index)

ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "{input_block}### Response:\n")


@dataclasses.dataclass(frozen=True)
class Example:
    """A token sequence and, per token, the id the model must predict there (``IGNORE`` if none).

    ``labels[t]`` is the target for the prediction made *at* position ``t`` (i.e. ``ids[t+1]`` or
    ``IGNORE``), so a batch needs no shifting.
    """

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def detect_format(record: dict[str, Any]) -> str:
    """``"chat"``, ``"instruction"`` or ``"text"``; raises ``DataError`` for anything else."""
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    raise DataError(f"unknown record format with keys {sorted(record)}: expected 'messages' (chat), "
                    "'instruction'/'input'/'output' (Alpaca) or 'text' (plain text)")


def fingerprint(records: Sequence[Record]) -> str:
    """A hash of the records' content (a resumed run must train on the same data)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.data, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- tokenising
def build_examples(records: Sequence[Record], tokenizer, max_seq_length: int,
                   prompt_style: str = "auto") -> list[Example]:
    """Tokenise every record; plain texts are packed into windows of ``max_seq_length`` tokens."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer: training on text needs tokenizer.json "
                        "(pass --tokenizer DIR, or load a checkpoint that ships one)")
    if prompt_style not in PROMPT_STYLES:
        raise DataError(f"prompt_style={prompt_style!r}: expected one of {', '.join(PROMPT_STYLES)}")
    examples, texts = [], []
    for record in records:
        try:
            kind = detect_format(record.data)
        except DataError as exc:
            raise DataError(f"{record.source}: {exc}") from None
        if kind == "text":
            texts.append(_text_ids(record, tokenizer))
            continue
        if kind == "chat":
            ids, answer = _chat_ids(record, tokenizer)
        else:
            ids, answer = _instruction_ids(record, tokenizer, prompt_style)
        examples.append(_supervised(ids, answer, record.source, max_seq_length))
    if texts:
        examples.extend(pack(texts, max_seq_length, source="text records"))
    return examples


def _supervised(ids: list[int], answer: list[bool], source: str, max_seq_length: int) -> Example:
    if not any(answer):
        raise DataError(f"{source}: the record has no answer tokens to learn (an assistant turn or "
                        "'output' with text is needed)")
    if len(ids) > max_seq_length:
        warnings.warn(f"{source}: {len(ids)} tokens, longer than max_seq_length={max_seq_length}: "
                      "truncated", stacklevel=3)
        ids, answer = ids[:max_seq_length], answer[:max_seq_length]
    labels = [ids[t + 1] if answer[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    if all(label == IGNORE for label in labels):
        raise DataError(f"{source}: no answer token is left within max_seq_length={max_seq_length}; "
                        "raise max_seq_length or shorten the prompt")
    return Example(tuple(ids), tuple(labels), source)


def _string(value: Any, field: str, source: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _chat_ids(record: Record, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and which of them belong to assistant turns.

    Each assistant turn's characters are found by rendering the conversation up to that turn
    twice: with the generation prompt (everything the model is given) and with the turn itself;
    the difference is what the model must write, including the template's end-of-turn marker.
    """
    messages = record.data["messages"]
    source = record.source
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{source}: messages[{n}] must be an object with 'role' and 'content'")
        _string(m["role"], f"messages[{n}].role", source)
        _string(m["content"], f"messages[{n}].content", source)
    render = _renderer(tokenizer, source)
    full = render(messages, False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:j], True), render(messages[: j + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(f"{source}: the chat template does not render turn {j} as an extension of the "
                            "turns before it, so the assistant's tokens cannot be located")
        spans.append((len(before), len(upto)))
    return _ids_with_spans(tokenizer, full, spans)


def _renderer(tokenizer, source: str):
    from ..errors import TokenizerError

    def render(messages, add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
        except TokenizerError as exc:
            raise DataError(f"{source}: {exc}") from None

    return render


def _ids_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Tokenise ``text`` (the template wrote any BOS) and mark tokens starting inside a span."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    answer = [any(a <= start < b for a, b in spans) and end > start
              for start, end in encoding.offsets]
    return ids, answer


def _instruction_ids(record: Record, tokenizer, prompt_style: str) -> tuple[list[int], list[bool]]:
    d, source = record.data, record.source
    instruction = _string(d.get("instruction", ""), "instruction", source)
    extra = _string(d.get("input", "") or "", "input", source)
    output = _string(d.get("output", ""), "output", source)
    if not output:
        raise DataError(f"{source}: 'output' is empty: the record has no answer tokens to learn")
    use_chat = prompt_style == "chat" or (prompt_style == "auto" and tokenizer.chat_template)
    if use_chat:
        user = instruction + ("\n\n" + extra if extra else "")
        return _chat_ids(Record({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": output}]}, source), tokenizer)
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if extra else "",
        instruction=instruction, input_block=f"### Input:\n{extra}\n\n" if extra else "")
    prompt_ids = tokenizer.encode(prompt)
    answer_ids = tokenizer.encode(output, add_special_tokens=False) + _eos(tokenizer)
    return prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids)


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_ids[0]] if tokenizer.eos_ids else []


def _text_ids(record: Record, tokenizer) -> list[int]:
    text = _string(record.data["text"], "text", record.source)
    if not text:
        raise DataError(f"{record.source}: 'text' is empty")
    return tokenizer.encode(text) + _eos(tokenizer)


def pack(documents: Sequence[Sequence[int]], max_seq_length: int, source: str = "text") -> list[Example]:
    """Concatenate documents and cut windows of ``max_seq_length`` tokens; consecutive windows share
    one token so that every token after the first is predicted exactly once.

    >>> [e.ids for e in pack([[1, 2, 3], [4, 5]], 3)]
    [(1, 2, 3), (3, 4, 5)]
    """
    if max_seq_length < 2:
        raise DataError(f"max_seq_length={max_seq_length}: packing needs at least 2 tokens per window")
    stream = [t for doc in documents for t in doc]
    examples = []
    for start in range(0, max(len(stream) - 1, 1), max_seq_length - 1):
        window = stream[start: start + max_seq_length]
        if len(window) < 2:
            break
        labels = tuple(window[1:]) + (IGNORE,)
        examples.append(Example(tuple(window), labels, f"{source} (tokens {start}-{start + len(window)})"))
    return examples


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded split: ``floor(len * fraction)`` examples held out for validation."""
    import torch

    if not 0.0 <= fraction < 1.0:
        raise DataError(f"val_split={fraction}: expected a fraction in [0, 1)")
    n_val = int(len(examples) * fraction)
    if n_val == 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


def collate(examples: Sequence[Example], pad_id: int = 0):
    """Right-padded ``(input_ids, labels)`` tensors; padding is never a target, and since the
    attention is causal, real tokens never see it."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels

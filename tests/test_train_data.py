"""Training data: formats, the answer-only loss mask, packing, and typed errors naming file:line."""

import json
import warnings

import pytest

from lucidlm.errors import DataError
from lucidlm.train.data import IGNORE, build_examples, collate, pack, read_records, split_validation

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is the capital of Quintaro?"},
                     {"role": "assistant", "content": "Zorblax."},
                     {"role": "user", "content": "And its river?"},
                     {"role": "assistant", "content": "The Vell."}]}


def target_text(tokenizer, example) -> str:
    """The text of every token the loss counts (labels[t] is the token at t+1)."""
    return tokenizer.decode([label for label in example.labels if label != IGNORE])


def test_chat_loss_counts_exactly_the_assistant_turns(ours):
    (example,) = build_examples(read_records([CHAT]), ours, 512)
    rendered = ours.apply_chat_template(CHAT["messages"], add_generation_prompt=False)
    assert ours.decode(example.ids) == rendered
    # the two replies, each with the template's end-of-turn marker; no system/user text, no headers
    assert target_text(ours, example) == "Zorblax.<|im_end|>\nThe Vell.<|im_end|>\n"


def test_instruction_uses_the_chat_template_or_alpaca(ours):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    (chat,) = build_examples(read_records([record]), ours, 512)
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in ours.decode(chat.ids)
    assert target_text(ours, chat) == "5<|im_end|>\n"
    (alpaca,) = build_examples(read_records([record]), ours, 512, prompt_style="alpaca")
    text = ours.decode(alpaca.ids)
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5" in text
    assert target_text(ours, alpaca) == "5" + ours.eos_token


def test_text_is_packed_and_every_token_counts(ours):
    docs = [{"text": "one two three four five six seven"}, {"text": "eight nine ten"}]
    examples = build_examples(read_records(docs), ours, 6)
    stream = [t for d in docs for t in ours.encode(d["text"]) + [ours.eos_ids[0]]]
    # consecutive windows share one token, so every token after the first is a target exactly once
    targets = [label for e in examples for label in e.labels if label != IGNORE]
    assert targets == stream[1:]
    assert all(len(e.ids) <= 6 for e in examples)


def test_pack_windows():
    assert [e.ids for e in pack([[1, 2, 3, 4, 5]], 3)] == [(1, 2, 3), (3, 4, 5)]
    assert [e.labels for e in pack([[1, 2, 3, 4, 5]], 3)] == [(2, 3, IGNORE), (4, 5, IGNORE)]


def test_collate_right_pads_with_ignored_labels(ours):
    examples = build_examples(read_records([CHAT, {"instruction": "Hi", "output": "Hello"}]), ours, 512)
    ids, labels = collate(examples)
    short = min(range(2), key=lambda i: len(examples[i].ids))
    assert (labels[short, len(examples[short].ids):] == IGNORE).all()
    assert ids.shape == labels.shape == (2, max(len(e.ids) for e in examples))


def test_overlong_example_is_truncated_with_a_warning(ours):
    record = {"instruction": "Say", "output": "word " * 200}
    with pytest.warns(UserWarning, match=r"record 0: \d+ tokens, longer than max_seq_length=64: truncated"):
        (example,) = build_examples(read_records([record]), ours, 64)
    assert len(example.ids) == 64 and example.n_targets > 0


def test_truncation_that_removes_every_answer_token_is_an_error(ours):
    record = {"instruction": "long " * 200, "output": "yes"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="record 0: no answer token is left within max_seq_length=32"):
            build_examples(read_records([record]), ours, 32)


def test_validation_split_is_seeded_and_disjoint():
    examples = pack([list(range(100))], 5)
    train, val = split_validation(examples, 0.25, seed=3)
    assert len(val) == len(examples) // 4 and not set(map(id, train)) & set(map(id, val))
    assert split_validation(examples, 0.25, seed=3)[1] == val
    assert split_validation(examples[:3], 0.25, seed=3) == (examples[:3], [])


@pytest.mark.parametrize("lines, message", [
    (['{"text": "fine"}', '{"text": "broken"'], r"data.jsonl:2: malformed JSON"),
    (['{"text": "fine"}', '[1, 2]'], r"data.jsonl:2: expected a JSON object, got list"),
    (['', '   '], r"data.jsonl: the dataset is empty"),
    (['{"prompt": "x"}'], r"data.jsonl:1: unknown record format with keys \['prompt'\]"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"data.jsonl:1: the record has no answer tokens"),
    (['{"instruction": "x", "output": ""}'], r"data.jsonl:1: 'output' is empty"),
    (['{"messages": [{"role": "user", "content": 3}]}'], r"data.jsonl:1: field 'messages\[0\].content' must be a string"),
    (['{"messages": "hello"}'], r"data.jsonl:1: 'messages' must be a non-empty list"),
    (['{"text": ""}'], r"data.jsonl:1: 'text' is empty"),
])
def test_bad_records_name_file_and_line(tmp_path, ours, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        build_examples(read_records(path), ours, 256)


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(DataError, match="data.jsonl:2: not UTF-8"):
        read_records(path)
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="record 1: expected a dict"):
        read_records([{"text": "a"}, "b"])


def test_no_tokenizer_is_a_typed_error():
    with pytest.raises(DataError, match="no tokenizer"):
        build_examples(read_records([{"text": "a"}]), None, 16)


def test_jsonl_and_list_give_the_same_examples(tmp_path, ours):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CHAT) + "\n")
    from_file = build_examples(read_records(path), ours, 512)
    from_list = build_examples(read_records([CHAT]), ours, 512)
    assert [(e.ids, e.labels) for e in from_file] == [(e.ids, e.labels) for e in from_list]

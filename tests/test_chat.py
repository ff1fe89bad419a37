"""Chat rendering with the GGUF's own template vs transformers' apply_chat_template (the oracle)."""

from __future__ import annotations

import pytest

from lucidlm.chat import render_chat
from lucidlm.errors import TokenizerError
from lucidlm.tokenizer import Tokenizer

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primes."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write `print('héllo 🤖')` in Python.\nThanks."},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_transformers(ours, oracle, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_chat_matches_transformers(ours, oracle, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = oracle.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if not isinstance(expected, list):  # transformers v5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(expected)


def test_default_system_prompt_comes_from_template(ours):
    text = ours.apply_chat_template(CONVERSATIONS["user_only"])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_missing_template_names_checkpoint():
    with pytest.raises(TokenizerError, match="my-checkpoint"):
        render_chat(None, [{"role": "user", "content": "hi"}], checkpoint="my-checkpoint")


def test_tokenizer_without_template_raises(converted, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((converted / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers():
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
        "{% if strftime_now('%Y') | length != 4 %}bad{% endif %}{{ eos_token }}"
    )
    out = render_chat(template, [{"role": "user", "content": "<é>"}], bos_token="[B]", eos_token="[E]")
    # tojson must not HTML-escape, unlike Jinja's built-in filter
    assert out == '[B]{"role": "user", "content": "<é>"}[E]'


def test_raise_exception_becomes_tokenizer_error():
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    with pytest.raises(TokenizerError, match="system first"):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_sandbox_blocks_python_internals():
    for template in ("{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"):
        with pytest.raises(TokenizerError, match="unsafe"):
            render_chat(template, [{"role": "user", "content": "hi"}])


def test_none_values_are_dropped():
    template = "{% for m in messages %}{{ m.get('content', 'missing') }}{% endfor %}"
    assert render_chat(template, [{"role": "assistant", "content": None}]) == "missing"

"""Render chat messages with the checkpoint's own Jinja chat template, as transformers does.

No prompt format is written by hand here: the template shipped with the checkpoint decides it.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from lucidlm.errors import TokenizerError


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    *,
    checkpoint: str | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with a Hugging Face chat template.

    Args:
        template: the Jinja source (``chat_template`` of ``tokenizer_config.json``).
        messages: ``[{"role": "user", "content": "..."}, ...]``.
        add_generation_prompt: append the header that starts the assistant's turn.
        bos_token, eos_token: exposed to the template, as transformers does.
        checkpoint: name used in error messages.
        **kwargs: further template variables (``tools``, ``documents``, ``unk_token``...).

    Raises:
        TokenizerError: no template, or the template failed.
    """
    import jinja2

    if not template:
        where = f" {checkpoint}" if checkpoint else ""
        raise TokenizerError(
            f"The checkpoint{where} has no chat template (no 'chat_template' in its tokenizer_config.json); "
            "pass a template explicitly or format the prompt as plain text"
        )
    _check_messages(messages)
    messages = [_drop_none(message) for message in messages]
    variables = {"tools": None, "documents": None, **kwargs}
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **variables,
        )
    except (jinja2.TemplateError, OverflowError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, RecursionError) as exc:  # whatever a template's own code raises
        where = f" of {checkpoint}" if checkpoint else ""
        raise TokenizerError(f"The chat template{where} failed: {type(exc).__name__}: {exc}") from exc


#: the roles chat templates know (OpenAI's, plus the tool roles of Llama 3 and others)
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")


def _check_messages(messages) -> None:
    """A list of ``{"role": str, "content": str | list | None}`` dicts with a known role."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"messages[{i}]: expected a dict with 'role' and 'content', got {message!r:.80}")
        role = message.get("role")
        if role not in ROLES:
            raise TokenizerError(f"messages[{i}]: role {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TokenizerError(f"messages[{i}]: content must be a string (or a list of parts), "
                                 f"got {type(content).__name__}")


def _drop_none(message: dict[str, Any]) -> dict[str, Any]:
    # transformers drops None values (e.g. OpenAI's content=None): templates handle a missing key
    # but would render a literal "None".
    if not isinstance(message, dict):
        raise TokenizerError(f"Chat messages must be dicts with 'role' and 'content', got {message!r}")
    return {key: value for key, value in message.items() if value is not None}


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """Compile once per template; the sandbox keeps untrusted templates from reaching Python."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"The chat template does not compile: {exc}") from exc

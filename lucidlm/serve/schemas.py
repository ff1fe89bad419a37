"""Request bodies of the server, as pydantic models: the OpenAI fields we honour, and ``/v1/explain``.

Every field is checked before a request reaches the model; a violation becomes a 400 with the
field named (see :mod:`lucidlm.serve.app`). Unknown OpenAI fields (``user``, ``presence_penalty``
...) are accepted and ignored, as OpenAI-compatible servers do, so that clients work unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..cache.spec import check_budget
from ..methods import check_method

Stop = str | list[str] | None


class Sampled(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    #: None: the server's default (the checkpoint's generation_config.json, else greedy; see
    #: :mod:`lucidlm.serve.defaults`), filled in before the request reaches the model
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None  # OpenAI's range
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None  # extension (as in vLLM)
    stop: Stop = Field(None, validate_default=True)
    seed: int | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request; ask again for more
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    #: lucidlm extension (as in vLLM): token ids and display strings in each choice or chunk
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Stop) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(Sampled):
    prompt: str | list[str] = Field(description="the text to continue (a list holding one string is accepted)")
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1 or not isinstance(value[0], str):
                raise ValueError("expected a string, or a list holding exactly one string")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as the chat template expects it (OpenAI's text parts joined into a string)."""
        content = self.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(str(part.get("text", "")) for part in content)
        role = "system" if self.role == "developer" else self.role
        return {**(self.model_extra or {}), "role": role, "content": content}


class ChatRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _newer_name(self) -> ChatRequest:
        if self.max_completion_tokens is not None:  # OpenAI's newer name for max_tokens
            self.max_tokens = self.max_completion_tokens
        return self


Target = int | str | list[int] | None


class ExplainRequest(BaseModel):
    """``/v1/explain``: exactly one of ``prompt``, ``messages`` or ``input_ids`` is the context.

    ``target``: ``None`` (the model's top next token), a token id, a token text, or a continuation
    (a multi-token string or a list of ids); with ``messages``, ``reply`` is the continuation to
    explain (the assistant's answer). ``contrast``: explain ``target`` against this token.
    ``diff``: explain it with the served (tuned) model against its base, answering an
    ``ExplanationDiff`` (a server started with a base: ``lucidlm serve --model BASE --adapter DIR``).
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    reply: str | None = None
    input_ids: list[Annotated[int, Field(ge=0)]] | None = None
    target: Target = None
    contrast: int | str | None = None
    method: str = "attnlrp"
    layers: bool | Literal["all"] | list[int] = False
    kv_cache: str | None = None
    cache_tokens: Annotated[int, Field(ge=1)] | str | None = None  # tokens, or a share such as "25%"
    diff: bool = False

    @field_validator("cache_tokens")
    @classmethod
    def _budget(cls, value: int | str | None) -> int | str | None:
        return check_budget(value)  # a CacheError is a ValueError: 0% or over 100% is a 422

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return check_method(value)  # the LRP methods and the baselines; an ExplainError is a ValueError

    @model_validator(mode="after")
    def _one_context(self) -> ExplainRequest:
        given = [name for name in ("prompt", "messages", "input_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages or input_ids (got {', '.join(given) or 'none'})")
        if self.reply is not None:
            if self.messages is None:
                raise ValueError("reply goes with messages (the conversation it answers)")
            if self.target is not None:
                raise ValueError("give reply or target, not both")
        if self.contrast is not None and (self.target is None or isinstance(self.target, list)):
            raise ValueError("contrast needs a single-token target")
        if self.diff and (self.kv_cache is not None or self.cache_tokens is not None):
            raise ValueError("diff explains both models over the whole context: leave out kv_cache and cache_tokens")
        return self

"""The FastAPI application: OpenAI-compatible completions, ``/v1/explain``, ``/health`` and the viewer.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the official
client raises its usual exceptions: 400 for a bad body or parameter (the field is named), 401 for
a missing or wrong API key, 404 for an unknown model, 413 for a body over the size limit, 503
when the queue is full.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LLM, Piece
from ..cache.spec import PolicySpec, parse_policy
from ..errors import LucidError
from ..generate import Sampling
from .defaults import SAMPLING_FIELDS, sampling_defaults
from .metrics import CONTENT_TYPE, REQUEST_START, CountRequests, ServerMetrics
from .schemas import ChatRequest, CompletionRequest, ExplainRequest, Sampled
from .batching import BatchEngine, GenRequest
from .worker import Busy, ModelWorker, text_pieces


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """Pure ASGI middleware: refuse a body over ``limit`` bytes before reading it (413), and a
    body of unknown length (411), so that no request can make the server buffer without bound."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is None:
                if b"chunked" in headers.get(b"transfer-encoding", b""):
                    return await error_response(411, "a Content-Length header is required")(scope, receive, send)
            elif not length.isdigit() or int(length) > self.limit:
                return await error_response(
                    413, f"request body of {length.decode(errors='replace')} bytes exceeds the server's "
                         f"limit of {self.limit} bytes", code="request_too_large")(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(llm: LLM, model_name: str | None = None, kv_cache: str | None = None,
               cache_tokens: int | str | None = None, api_key: str | None = None, max_queue: int = 16,
               max_body_bytes: int = 1 << 20, base: LLM | Callable[[], LLM] | None = None,
               max_batch: int = 8, adapter: str | None = None) -> FastAPI:
    """The server's app for ``llm``. ``kv_cache``/``cache_tokens``: the KV-cache policy every
    generation runs with (explanations too, when the request asks for it). ``api_key``: required
    as ``Authorization: Bearer KEY`` on ``/v1/*``. ``max_batch``: the most
    sequences decoded together (continuous batching, :mod:`lucidlm.serve.worker`); ``max_queue``:
    requests waiting beyond them before new ones get 503. ``max_body_bytes``: larger bodies get 413.

    ``base``: the model ``llm`` was tuned from (an ``LLM``, or a function that loads it: called
    once, on the model thread, at the first request that needs it). With it ``/v1/explain``
    answers ``"diff": true`` with the :class:`~lucidlm.explain.diff_result.ExplanationDiff` of
    ``llm`` against ``base``; ``lucidlm serve --model BASE --adapter DIR`` serves BASE+adapter with
    BASE (loaded without the adapter) as ``base``. ``adapter``: the attached adapter's directory,
    listed by ``/v1/models`` (as vLLM lists a LoRA module: its own card with ``root`` and ``parent``).

    A request that leaves out ``temperature``/``top_p``/``top_k`` gets the checkpoint's
    ``generation_config.json`` values, else greedy (:mod:`lucidlm.serve.defaults`; ``/v1/models``
    says which). ``/metrics``: Prometheus text (:mod:`lucidlm.serve.metrics`).

    >>> from fastapi.testclient import TestClient     # doctest: +SKIP
    >>> client = TestClient(create_app(LLM.load()))    # doctest: +SKIP
    >>> client.get("/health").json()["status"]         # doctest: +SKIP
    'ready'
    """
    if llm.tokenizer is None:
        raise LucidError(f"{llm.source}: the checkpoint has no tokenizer, so it cannot be served")
    policy = PolicySpec("dense") if kv_cache is None else parse_policy(kv_cache)
    if kv_cache is not None:  # a bad budget fails now, not on the first request
        from ..cache import build_cache

        build_cache(llm.config, 1, policy, cache_tokens)
    name = model_name or llm.name
    metrics = ServerMetrics(lambda: worker.stats())
    worker = ModelWorker(max_queue, max_batch, BatchEngine(llm.model, llm.tokenizer.eos_ids, policy, cache_tokens),
                         on_step=metrics.step)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(title="lucidlm", description="OpenAI-compatible server with AttnLRP explanations",
                  docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    app.state.llm, app.state.worker, app.state.metrics, app.state.model_name = llm, worker, metrics, name
    _install_error_handlers(app)
    server = _Server(llm, name, worker, policy, cache_tokens, base)
    server.metrics, server.adapter = metrics, adapter
    authorised = [Depends(_key_check(api_key))]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ready", "model": name, "context_length": llm.config.block_size,
                "kv_cache": kv_cache, "cache_tokens": cache_tokens, "auth": api_key is not None,
                "diff": base is not None, **worker.stats()}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    def viewer() -> str:
        from .viewer import viewer_page

        return viewer_page()

    @app.get("/v1/models", dependencies=authorised)
    def models() -> dict[str, Any]:
        return {"object": "list", "data": server.model_cards()}

    @app.get("/v1/models/{model_id:path}", dependencies=authorised)
    def model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return next(card for card in server.model_cards() if card["id"] == model_id)

    @app.post("/v1/completions", dependencies=authorised)
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        ids = server.check_length(llm.tokenizer.encode(body.prompt), "prompt")
        return await server.respond(server.with_defaults(body), ids, "text_completion", request)

    @app.post("/v1/chat/completions", dependencies=authorised)
    async def chat_completions(body: ChatRequest, request: Request):
        server.check_model(body.model)
        try:
            messages = [m.as_dict() for m in body.messages]
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        ids = server.check_length(llm.tokenizer.encode_chat(messages, add_generation_prompt=True), "messages")
        return await server.respond(server.with_defaults(body), ids, "chat.completion", request)

    @app.post("/v1/explain", dependencies=authorised)
    async def explain(body: ExplainRequest) -> dict[str, Any]:
        if body.model is not None:
            server.check_model(body.model)
        ids, target = server.explain_inputs(body)
        layers = "all" if body.layers is True else (body.layers or None)
        if body.diff:
            server.check_diff()
            result = await worker.run(lambda: server.explain_diff(ids, target, body.method, layers))
            return explanation_json(result, name, "explanation.diff")
        if layers is None and body.kv_cache is None:  # explanations waiting together: one explain_batch
            result = await worker.run_grouped(("explain", body.method), (ids, target, body.method),
                                               server.explain_together)
        else:
            result = await worker.run(lambda: llm.explain(ids, target=target, method=body.method, layers=layers,
                                                          kv_cache=body.kv_cache, cache_tokens=body.cache_tokens))
        return explanation_json(result, name)

    return app


def explanation_json(e, model_name: str, kind: str = "explanation") -> dict[str, Any]:
    """``/v1/explain``'s answer: the explanation's wire form (``e.to_dict()``: plain lists, and
    ``"NaN"``/``"Infinity"`` for what JSON cannot spell; README, "Wire format") with the OpenAI-style
    ``object`` (``kind``: ``"explanation"``, or ``"explanation.diff"`` for a diff) and the serving
    ``model``. ``Explanation.from_dict`` (``ExplanationDiff.from_dict``, ``load_dict``) reads it back."""
    return {"object": kind, "model": model_name, **e.to_dict()}


class _Server:
    """What the routes share: the model, its name, the worker and the generation policy."""

    def __init__(self, llm: LLM, name: str, worker: ModelWorker, policy: PolicySpec,
                 cache_tokens: int | None, base: LLM | Callable[[], LLM] | None = None) -> None:
        self.llm, self.name, self.worker = llm, name, worker
        self.policy, self.cache_tokens = policy, cache_tokens  # parsed once, by create_app
        self.base = base  # an LLM, or its loader until the first diff request calls it
        self.created = int(time.time())
        self.defaults = sampling_defaults(llm.directory)
        self.metrics: ServerMetrics | None = None  # set by create_app
        self.adapter: str | None = None  # the attached adapter's directory, if any

    @property
    def adapter_id(self) -> str | None:
        return None if self.adapter is None else Path(self.adapter).name or str(self.adapter)

    def model_cards(self) -> list[dict[str, Any]]:
        """``/v1/models``: the served model (``sampling_defaults``: what a request that leaves
        them out gets), and with an adapter its card as vLLM writes a LoRA module's: ``root`` its
        directory, ``parent`` the served model. Both ids answer with the adapter attached."""
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "lucidlm",
                "root": self.llm.source, "parent": None, "context_length": self.llm.config.block_size,
                "sampling_defaults": self.defaults}
        if self.adapter is None:
            return [card]
        card["adapter"] = {"id": self.adapter_id, "path": str(self.adapter)}
        return [card, {"id": self.adapter_id, "object": "model", "created": self.created, "owned_by": "lucidlm",
                       "root": str(self.adapter), "parent": self.name,
                       "context_length": self.llm.config.block_size, "sampling_defaults": self.defaults}]

    def with_defaults(self, body: Sampled) -> Sampled:
        """``body`` with the sampling fields it leaves out set to the server's defaults."""
        missing = {k: self.defaults[k] for k in SAMPLING_FIELDS if getattr(body, k) is None}
        return body.model_copy(update=missing) if missing else body

    def check_model(self, model: str) -> None:
        if model not in (self.name, self.adapter_id):
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.name!r}",
                           code="model_not_found", param="model")

    def check_length(self, ids: list[int], param: str) -> list[int]:
        n, limit = len(ids), self.llm.config.block_size
        if n == 0:
            raise APIError(400, f"{param}: no tokens to continue", param=param)
        if n >= limit:
            raise APIError(400, f"{param}: {n} tokens do not fit the model's context length of {limit} tokens "
                                "(at least one token must be left to generate)",
                           code="context_length_exceeded", param=param)
        return ids

    # ---- generation -------------------------------------------------------------------------
    def pieces(self, ids: list[int], body: Sampled) -> AsyncIterator[Piece]:
        """The reply's pieces, one per generated token, from the worker's decode batch; admission
        (:class:`Busy`) happens here, before any response starts."""
        sampling = Sampling(body.temperature, body.top_k, body.top_p if body.top_p < 1 else None, body.seed)
        max_new = body.max_tokens if body.max_tokens is not None else self.llm.config.block_size
        tokens = self.worker.generate(GenRequest(ids, max_new, sampling))
        return text_pieces(self.llm.tokenizer, tokens, body.stop)

    async def respond(self, body: Sampled, ids: list[int], kind: str, request: Request):
        items = self.pieces(ids, body)  # Busy (before the response): 503
        if body.stream:
            sse = _sse(_Reply(self, body, ids, kind).chunks(items, request))
            return StreamingResponse(sse, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with contextlib.aclosing(items):  # a client gone mid-request frees the slot now
            return _Reply(self, body, ids, kind).whole([piece async for piece in items])

    # ---- explanations -----------------------------------------------------------------------
    def explain_inputs(self, body: ExplainRequest) -> tuple[list[int], Any]:
        """Context ids and the target in the form :meth:`LLM.explain` takes."""
        tok, vocab = self.llm.tokenizer, self.llm.config.vocab_size
        if body.input_ids is not None:
            bad = [i for i in body.input_ids if i >= vocab]
            if bad:
                raise APIError(400, f"input_ids: {bad[0]} is not a token id (vocabulary of {vocab})",
                               param="input_ids")
            ids = list(body.input_ids)
        elif body.messages is not None:
            ids = tok.encode_chat([m.as_dict() for m in body.messages], add_generation_prompt=True)
        else:
            ids = tok.encode(body.prompt)
        self.check_length(ids, "input_ids" if body.input_ids is not None else
                          ("messages" if body.messages is not None else "prompt"))
        target = body.reply if body.reply is not None else body.target
        if body.contrast is not None:
            target = (target, body.contrast)
        return ids, target

    def explain_together(self, items: list[tuple[list[int], Any, str]]) -> list[Any]:
        """Runs on the model thread: explanations of one method that arrived together, in one
        :func:`~lucidlm.explain.batch.explain_batch` call (each as ``LLM.explain`` gives it)."""
        from ..explain.batch import explain_batch

        return explain_batch(self.llm.model, self.llm.tokenizer, [ids for ids, _, _ in items],
                             targets=[target for _, target, _ in items], method=items[0][2])

    # ---- diffs ------------------------------------------------------------------------------
    def check_diff(self) -> None:
        if self.base is None:
            raise APIError(400, "diff: this server has no base model to compare with: serve a tuned model with "
                                "its base, 'lucidlm serve --model BASE --adapter DIR' (or create_app(..., base=...))",
                           code="no_base_model", param="diff")

    def base_llm(self) -> LLM:
        """Runs on the model thread (one job at a time, so the loader runs once): the base model,
        loaded by the first diff request that needs it."""
        if not isinstance(self.base, LLM):
            self.base = self.base()
        return self.base

    def explain_diff(self, ids: list[int], target: Any, method: str, layers: Any):
        """Runs on the model thread: the served model's explanation of ``ids`` against the base's."""
        from ..explain.diff import explain_diff

        base = self.base_llm()
        return explain_diff(self.llm.model, self.llm.tokenizer, base.model, base.tokenizer, ids, target=target,
                            method=method, layers=layers)


class _Reply:
    """One response in OpenAI's JSON: whole, or as stream chunks."""

    def __init__(self, server: _Server, body: Sampled, ids: list[int], kind: str) -> None:
        self.server, self.body, self.ids, self.kind = server, body, ids, kind
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.chat = kind == "chat.completion"
        self.start = REQUEST_START.get(None) or time.perf_counter()  # set by CountRequests

    def _measured(self, generated: int, first_token: float | None) -> None:
        if self.server.metrics is not None:
            now = time.perf_counter()
            ttft = None if first_token is None else first_token - self.start
            self.server.metrics.reply(len(self.ids), generated, ttft, now - self.start)

    def _tokens(self, ids: list[int]) -> list[str]:
        from ..explain.targets import token_strings

        return token_strings(self.server.llm.tokenizer, ids)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": len(self.ids), "completion_tokens": completion_tokens,
                "total_tokens": len(self.ids) + completion_tokens}

    @staticmethod
    def finish_reason(pieces: list[Piece]) -> str:
        return "stop" if pieces and pieces[-1].stopped else "length"

    def _envelope(self, choices: list[dict], chunk: bool) -> dict[str, Any]:
        kind = self.kind + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.server.name,
                "choices": choices}

    def whole(self, pieces: list[Piece]) -> dict[str, Any]:
        text = "".join(p.text for p in pieces)
        generated = [t for p in pieces for t in p.tokens]
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason(pieces), "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = (self.body.prompt + text) if getattr(self.body, "echo", False) else text
        if self.body.return_token_ids:
            choice.update(self._ids_fields(self.ids, "prompt_") | self._ids_fields(generated))
        self._measured(len(generated), time.perf_counter() if generated else None)
        return self._envelope([choice], chunk=False) | {"usage": self.usage(len(generated))}

    def _ids_fields(self, ids: list[int], prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}token_ids": ids, f"{prefix}tokens": self._tokens(ids)}

    def _delta(self, text: str, first: bool = False) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "delta": ({"role": "assistant"} if first else {}) | {"content": text},
                    "finish_reason": None, "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": None, "logprobs": None}

    async def chunks(self, pieces: AsyncIterator[Piece], request: Request) -> AsyncIterator[dict[str, Any]]:
        first = self._delta("", first=True)
        if self.body.return_token_ids:
            first |= self._ids_fields(self.ids, "prompt_")
        if self.chat or self.body.return_token_ids:
            yield self._envelope([first], chunk=True)
        n_tokens, last, first_token = 0, None, None
        try:
            async for piece in pieces:
                n_tokens += len(piece.tokens)
                if first_token is None and piece.tokens:
                    first_token = time.perf_counter()
                last = piece
                if piece.text or (self.body.return_token_ids and piece.tokens):
                    choice = self._delta(piece.text)
                    if self.body.return_token_ids:
                        choice |= self._ids_fields(piece.tokens)
                    yield self._envelope([choice], chunk=True)
                if await request.is_disconnected():
                    return  # closing `pieces` stops the generation at its next token
        finally:
            await pieces.aclose()
            self._measured(n_tokens, first_token)
        end = self._delta("") | {"finish_reason": "stop" if last is not None and last.stopped else "length"}
        if self.chat:
            end["delta"] = {}
        yield self._envelope([end], chunk=True)
        if self.body.include_usage:
            yield self._envelope([], chunk=True) | {"usage": self.usage(n_tokens)}


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events: ``data: {json}`` per chunk, then ``data: [DONE]``; an error that happens
    after the stream started (the status is already 200) is sent as an error event."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except LucidError as exc:
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
    yield "data: [DONE]\n\n"


def _key_check(api_key: str | None):
    def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.kind)

    @app.exception_handler(Busy)
    async def busy(_request, exc: Busy):  # the queue is full: the client may retry
        return error_response(503, str(exc), code="server_busy", kind="server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        problems, param = [], None
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            param = param or where or None
            if err.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            elif not where and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
                problems.append("the body must be a JSON object (see the OpenAI API reference for its fields)")
            else:
                problems.append(f"{where or 'body'}: {err.get('msg', '').removeprefix('Value error, ')}")
        return error_response(400, "; ".join(problems), code="invalid_request", param=param)

    @app.exception_handler(LucidError)
    async def lucid(_request, exc: LucidError):
        return error_response(400, str(exc), code="invalid_request")

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):  # a bug, not the client's fault: say so in JSON
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http(_request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), kind="invalid_request_error")

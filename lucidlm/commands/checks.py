"""What every command's arguments must satisfy before anything loads: text is non-empty UTF-8, the
model exists (or is a hub repo id), the files read (``--adapter`` wherever a command has it) exist
and the directories written to exist.
Touches only the file system's metadata: no model file is opened, nothing heavy imported.

>>> import argparse
>>> check(argparse.Namespace(prompt="hi", cache_tokens=64, kv_cache=None), Command("x", "x", print, print))
['--cache-tokens 64 without --kv-cache: using the window policy (the latest tokens); pass --kv-cache to choose another']
>>> check(argparse.Namespace(prompt=""), Command("x", "x", print, print))
Traceback (most recent call last):
...
lucidlm.commands.options.UsageError: the prompt is empty
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .options import Command, UsageError, missing_model


def check(args: argparse.Namespace, command: Command) -> list[str]:
    """Notes to print (on stderr); raises :class:`UsageError` for an argument that cannot work."""
    if getattr(args, "prompt", None) == "":
        raise UsageError("the prompt is empty")
    if getattr(args, "target", None) == "":
        raise UsageError("argument --target: the target is empty")
    for name in ("prompt", "target", "system"):
        _check_utf8(getattr(args, name, None), "the prompt" if name == "prompt" else f"argument --{name}")
    flag, model = command.model(args)
    _check_model(model, flag)
    for flag, path in [("--adapter", getattr(args, "adapter", None)), *command.inputs(args)]:
        if path is not None and not Path(path).exists():
            raise UsageError(f"{path}: no such file or directory ({flag})")
    for flag, path in command.outputs(args):
        if path is not None and not Path(path).parent.is_dir():
            raise UsageError(f"argument {flag}: the directory {Path(path).parent} does not exist")
    if getattr(args, "tensor_parallel", False) and "WORLD_SIZE" not in os.environ:
        raise UsageError("--tensor-parallel needs the process group torchrun starts: run torchrun "
                         "--nproc-per-node N -m lucidlm ... --tensor-parallel")
    notes = []
    if getattr(args, "cache_tokens", None) is not None and getattr(args, "kv_cache", "") is None:
        args.kv_cache = "window"
        notes.append(f"--cache-tokens {args.cache_tokens} without --kv-cache: using the window policy (the "
                     "latest tokens); pass --kv-cache to choose another")
    return notes


def _check_utf8(text: str | None, what: str) -> None:
    """Python turns command-line bytes that are not UTF-8 into lone surrogates; no tokenizer can
    encode those, so say so here rather than fail inside one."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = exc.object[exc.start:exc.start + 1].encode("utf-8", "surrogateescape")
        raise UsageError(f"{what} is not valid UTF-8 (byte {byte!r} at character {exc.start}): pass UTF-8 text") \
            from None


def _check_model(value: str | None, flag: str) -> None:
    if value is None:
        return
    problem = missing_model(value)
    if problem is not None:
        raise UsageError(f"argument {flag}: {problem}")

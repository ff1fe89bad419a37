"""``lucidlm generate`` (continue raw text) and ``lucidlm chat`` (an interactive chat).

>>> args = GENERATE.parse(["Once upon", "--max-new-tokens", "5", "--adapter", "run"])
>>> args.max_new_tokens, args.adapter, args.no_check_base
(5, PosixPath('run'), False)
"""

from __future__ import annotations

import argparse
import io
import sys

from .options import (Command, add_adapter, add_device_map, add_keep_quantized, add_model, add_sampling,
                      add_tensor_parallel, every_process, load, sampling_kwargs)


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue")
    add_model(p)
    add_keep_quantized(p)
    add_adapter(p, "continue with this adapter attached to --model")
    add_device_map(p)
    add_sampling(p, 128)
    add_tensor_parallel(p)


def run_generate(args: argparse.Namespace) -> int:
    llm = load(args)
    with every_process(llm) as main:
        out = sys.stdout if main else io.StringIO()  # every process decodes; the first one prints
        for piece in llm.generate(args.prompt, stream=True, **sampling_kwargs(args)):
            out.write(piece)
            out.flush()
        out.write("\n")
    return 0


def add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system message (default: none)")
    add_model(p)
    add_keep_quantized(p)
    add_adapter(p, "chat with this adapter attached to --model")
    add_device_map(p)
    add_sampling(p, 512)


def run_chat(args: argparse.Namespace) -> int:
    from ..repl import Repl

    llm = load(args)  # the banner names it by LLM.name (org/name for a hub snapshot)
    return Repl(llm, system=args.system, options=sampling_kwargs(args)).run()


GENERATE = Command("generate", "continue raw text; prints only the completion", add_generate, run_generate)
CHAT = Command("chat", "interactive chat with the checkpoint's template (streams tokens)", add_chat, run_chat,
               epilog="In the chat, /help lists the commands: /reset, /save FILE, /system TEXT, /explain [N],\n"
                      "/quit. Ctrl-C stops a reply and keeps the conversation; Ctrl-C or Ctrl-D at the\n"
                      "prompt quits. Piped input: one user turn a line; the output marks the turns.")

"""``lucidlm chat``: a conversation with a model, streamed token by token, with slash commands.

Commands (``/help`` lists them): ``/reset`` (forget the conversation, keep the system message),
``/save FILE`` (the conversation as JSON), ``/system TEXT`` (set the system message; no TEXT:
remove it), ``/explain [N]`` (which tokens made the model write token N of the last reply; 0, the
first, by default), ``/help``, ``/quit``. A message that starts with ``/`` is sent as ``//...``.

Ctrl-C during a reply stops it: what was printed stays in the conversation as the assistant's turn
(so turns keep alternating and ``/explain`` can look at it); a reply stopped before its first token
is dropped with its question. Ctrl-C or Ctrl-D at the prompt quits
(exit status 0). On a terminal, ``readline`` gives line editing and history (arrow keys); piped,
every non-empty line is a user turn and stdout marks the turns (``user: ...``, ``assistant: ...``).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .cache.spec import parse_policy
from .errors import LucidError

HELP = """\
/reset          forget the conversation (the system message stays)
/save FILE      write the conversation as JSON: {"model": ..., "messages": [...]}
/system TEXT    set the system message (no TEXT: remove it)
/explain [N]    which tokens made the model write token N of the last reply (default 0, the first)
/help           this list
/quit           leave (Ctrl-D, or Ctrl-C at the prompt, too)
Ctrl-C during a reply stops it and keeps what was written. Start a message with // to send a leading /."""


class Repl:
    """One chat session. ``options``: ``lucidlm chat``'s sampling and KV-cache options
    (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``, ``kv_cache``,
    ``cache_tokens``). ``name``: shown in the banner and saved files (default :attr:`LLM.name <lucidlm.api.LLM.name>`)."""

    def __init__(self, llm, system: str | None = None, options: dict[str, Any] | None = None,
                 name: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None) -> None:
        self.llm = llm
        self.options = dict(options or {})
        self.policy = parse_policy(self.options.get("kv_cache") or "dense")  # once, for every reply
        self.name = name or llm.name
        self.system = system or None
        self.turns: list[dict[str, str]] = []  # user and assistant messages, alternating
        self.last: tuple[list[int], list[int]] | None = None  # the last reply: its prompt ids, its ids
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.interactive = self.stdin.isatty()

    def messages(self) -> list[dict[str, str]]:
        """The conversation as ``llm.chat`` takes it (the system message first, if any)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in self.turns]

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        if self.interactive:
            try:
                import readline  # noqa: F401  (importing it gives input() line editing and history)
            except ImportError:  # pragma: no cover - platforms without readline
                pass
            self._note(f"Chatting with {self.name}. /help lists the commands; Ctrl-C stops a reply; "
                       "Ctrl-D or /quit leaves.")
        while True:
            try:
                line = self._read()
            except (KeyboardInterrupt, EOFError):
                if self.interactive:
                    self._note("")  # leave the terminal on a new line after ^C / ^D
                return 0
            if line is None:
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                if not self.command(text):
                    return 0
                continue
            self.reply(text[1:] if text.startswith("//") else text)

    def _read(self) -> str | None:
        if self.interactive:
            return input("> ")
        line = self.stdin.readline()
        return line if line else None

    def _note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def _out(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    # ---- a reply --------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        """Stream the model's answer to ``text``; Ctrl-C stops it and keeps what was written."""
        tok = self.llm.tokenizer
        self.turns.append({"role": "user", "content": text})
        if not self.interactive:
            self._out(f"user: {text}")
            self._out("assistant: ", end="")
        written: list[str] = []
        ids: list[int] = []
        try:
            prompt = tok.encode_chat(self.messages(), add_generation_prompt=True)
            for piece in self._pieces(prompt):
                ids.extend(t for t in piece.tokens if t not in tok.eos_ids)
                written.append(piece.text)
                self._out(piece.text, end="")
        except KeyboardInterrupt:
            self._out()
            if not ids:  # stopped before the first token: the question is withdrawn with it
                self.turns.pop()
                self._note("(reply stopped before it began; the message was dropped)")
                return
            self._note("(reply stopped; what was written stays in the conversation)")
        except LucidError as exc:
            self._out()
            self._note(f"lucidlm: error: {exc}")
            self.turns.pop()  # the question goes unanswered: the conversation stays as it was
            return
        else:
            self._out()
        self.turns.append({"role": "assistant", "content": "".join(written)})
        self.last = (prompt, ids)

    def _pieces(self, prompt: list[int]):
        from .api import stream_pieces
        from .generate import Sampling, generate_ids

        o = self.options
        sampling = Sampling(o.get("temperature", 0.0), o.get("top_k"), o.get("top_p"), o.get("seed"))
        steps = generate_ids(self.llm.model, [prompt], o.get("max_new_tokens", 512), sampling,
                             self.llm.tokenizer.eos_ids, kv_cache=self.policy, cache_tokens=o.get("cache_tokens"))
        stop = o.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return stream_pieces(self.llm.tokenizer, (step[0] for step in steps), stops)

    # ---- slash commands -------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False when the session should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self._out(HELP)
        elif name == "/reset":
            self.turns.clear()
            self.last = None
            self._note("(conversation cleared)")
        elif name == "/system":
            self.system = arg or None
            self._note("(system message set)" if arg else "(system message removed)")
        elif name == "/save":
            self.save(arg)
        elif name == "/explain":
            self.explain(arg)
        else:
            self._note(f"unknown command {name}: /help lists the commands")
        return True

    def save(self, path: str) -> None:
        from .fileio import atomic_write

        if not path:
            self._note("/save needs a file name: /save chat.json")
            return
        data = {"model": self.name, "messages": self.messages()}
        try:
            atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except (OSError, LucidError) as exc:
            self._note(f"lucidlm: error: cannot write {path}: {exc}")
            return
        self._note(f"wrote {path}")

    def explain(self, arg: str) -> None:
        if self.last is None:
            self._note("nothing to explain yet: /explain looks at the last reply")
            return
        prompt, ids = self.last
        if not ids:
            self._note("the last reply has no tokens to explain")
            return
        try:
            n = int(arg) if arg else 0
        except ValueError:
            n = -1
        if not 0 <= n < len(ids):
            self._note(f"/explain N: N is a token of the last reply, 0 to {len(ids) - 1} (got {arg})")
            return
        try:
            explanation = self.llm.explain(prompt + ids[:n], target=ids[n])
        except KeyboardInterrupt:
            self._note("(explanation stopped)")
            return
        except LucidError as exc:
            self._note(f"lucidlm: error: {exc}")
            return
        self._out(explanation.to_terminal(color=self.stdout.isatty()))

"""Peak RSS of a child process that is its own, not its parent's.

On Linux a child's peak RSS starts at its parent's: ``fork`` copies the parent's memory map and
``exec`` records that map's high-water mark as the child's (``ru_maxrss``, for the child itself and
for ``RUSAGE_CHILDREN``/``wait4`` alike). A bench parent that imported torch (hundreds of MB) would
hide every child smaller than itself. So a measured child starts from a small launcher instead: a
bare ``python -S`` (about 10 MB) that runs the command and, for a binary that does not measure
itself, writes the command's own peak (its ``RUSAGE_CHILDREN``) as the last line of stderr.

>>> fresh(["llama-bench", "-m", "x.gguf"])[4:]
['llama-bench', '-m', 'x.gguf']
>>> peak_from_stderr("loading...\\n" + RSS_LINE.format(kb=204800))
('loading...', 200.0)
"""

from __future__ import annotations

import re
import sys

#: runs argv[1:]; passes stdout through; its last stderr line: the command's peak RSS in KiB
_LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
             "sys.stderr.write('\\nlucidlm-child-peak-rss-kb=%d\\n' % "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
RSS_LINE = "lucidlm-child-peak-rss-kb={kb}"


def fresh(command: list[str]) -> list[str]:
    """``command`` started from a small launcher (its peak RSS then is its own)."""
    return [sys.executable, "-S", "-c", _LAUNCHER, *command]


def peak_from_stderr(stderr: str) -> tuple[str, float | None]:
    """The command's own stderr and its peak RSS in MiB (None when the launcher's line is absent)."""
    found = re.search(r"\n?lucidlm-child-peak-rss-kb=(\d+)\s*$", stderr)
    if found is None:
        return stderr, None
    return stderr[:found.start()].rstrip("\n"), int(found.group(1)) / 1024

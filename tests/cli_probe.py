"""Run ``lucidlm.cli.main(argv)`` in a fresh interpreter and report what it touched: its exit
status, the heavy modules it imported, and the files it opened under a watched path. The command
line's tests use it to show that argument errors and refusals come before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# records every file opened under the first argument, runs main(argv), and prints the exit status,
# the heavy modules imported and the opened files as JSON (the last line of stdout)
PROBE = textwrap.dedent("""
    import json, sys
    watched, argv = sys.argv[1], sys.argv[2:]
    opened = []
    def hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(watched):
            opened.append(args[0])
    sys.addaudithook(hook)
    from lucidlm.cli import main
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    heavy = sorted(m for m in ("torch", "numpy", "transformers", "tokenizers", "fastapi") if m in sys.modules)
    print(json.dumps({"status": status, "heavy": heavy, "opened": opened}))
""")


def probe(*argv: object, watched: object = "/nonexistent-prefix", unset: tuple[str, ...] = ()
          ) -> tuple[dict, str]:
    """``({"status": ..., "heavy": [...], "opened": [...]}, stderr)`` of ``lucidlm ARGV``; ``unset``:
    environment variables the command must not see."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run([sys.executable, "-c", PROBE, str(watched), *map(str, argv)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

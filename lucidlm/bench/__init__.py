"""Side-by-side benchmarks (``lucidlm bench ...``); each measurement runs in a child process."""

from __future__ import annotations

import json
import subprocess


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one measurement: the child prints a JSON line last; a failure becomes ``{"error": its
    last stderr line}`` so that the table can say which row failed."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])

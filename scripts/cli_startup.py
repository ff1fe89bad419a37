"""How long the ``lucidlm`` command takes before it does anything: help, the catalogue, argument errors.

Runs each command ``--runs`` times (default 5) in a fresh process and prints the median wall time
with a pass/fail column against ``--budget`` seconds (default 0.5). Run from the repository root:

    python scripts/cli_startup.py

Uses the ``lucidlm`` script next to this interpreter when there is one (what a user types), else
``python -m lucidlm``. Exit status 1 when a command misses the budget.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [["--help"], ["models"], ["generate", "--kv-cache", "foo", "x"], ["explain", ""], ["bench", "--help"]]


def lucidlm_command() -> list[str]:
    script = Path(sys.executable).with_name("lucidlm")
    if script.is_file():
        return [str(script)]
    found = shutil.which("lucidlm")
    return [found] if found else [sys.executable, "-m", "lucidlm"]


def measure(command: list[str], runs: int) -> tuple[float, int]:
    """Median wall seconds of ``runs`` runs, and the exit status of the last one."""
    times, status = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        status = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - t0)
    return statistics.median(times), status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median reported)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds a command may take")
    args = parser.parse_args(argv)
    base = lucidlm_command()
    rows = [(" ".join(["lucidlm", *(a if a else '""' for a in cmd)]), *measure(base + cmd, args.runs))
            for cmd in COMMANDS]
    width = max(len(r[0]) for r in rows)
    print(f"{'command':<{width}}  {'median s':>8}  {'exit':>4}  {'<' + format(args.budget, 'g') + ' s':>6}")
    for name, seconds, status in rows:
        print(f"{name:<{width}}  {seconds:>8.3f}  {status:>4}  {'pass' if seconds < args.budget else 'FAIL':>6}")
    return 0 if all(seconds < args.budget for _, seconds, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

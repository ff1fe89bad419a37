"""Side-by-side benchmarks (``lucidlm bench ...``); each measurement runs in a child process."""

from __future__ import annotations

import json
import subprocess

from ..progress import progress  # noqa: F401  (the bench modules take it from here)


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one measurement: the child prints a JSON line last; a failure becomes ``{"error": its
    last stderr line}`` so that the table can say which row failed."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit(line: str = "") -> None:
    """Print one line of results to stdout now, above any progress bar on stderr: tables appear
    row by row as they are measured, and stdout holds nothing but results."""
    import sys

    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def prepare_model(model: str | None) -> None:
    """Do a model's one-off work here, with progress on stderr, before measuring: convert a GGUF
    (the embedded default when ``model`` is None) into the conversion cache, download a hub repo
    id. Child processes then find it ready instead of converting silently inside a measurement."""
    from ..checkpoints import checkpoint_dir

    checkpoint_dir(model, progress=True)

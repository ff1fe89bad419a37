"""Runs of ``lucidlm ...`` in one process and under ``torchrun`` with two, for the tests that check
both write the same bytes (explain-dataset, with and without --diff-against; training)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import torch

from lucidlm.cli import main

#: torchrun beside this Python (None: the torchrun tests skip, naming it)
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def shard_bytes(out: pathlib.Path) -> dict[str, bytes]:
    """The shard files of an explain-dataset directory, by name."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def one_and_two_processes(args: list[str], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    """``lucidlm ARGS --out tmp_path/one`` in this process with one thread (as torchrun's workers:
    the same kernels, so the same bits), then under torchrun with two processes into
    ``tmp_path/two``; returns the torchrun run (checked to have exited 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + ["--no-progress", "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "lucidlm", *args,
                           "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done

"""Interrupted fine-tunes can always be resumed or restarted: a checkpoint every tenth of the run by
default, one on Ctrl-C (SIGINT) before a non-zero exit that says how to go on, ``overwrite`` to
start afresh, and a run that stopped before its first checkpoint is no dead end."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import lucidlm
from lucidlm.cli import main
from lucidlm.errors import TrainError
from lucidlm.train.loop import TrainInterrupted

RECORDS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                         {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
           for a in range(4) for b in range(3)]
OPTIONS = dict(method="lora", batch_size=4, lr=1e-2, val_split=0.0, precision="fp32", progress=False)


def run(directory, out, **options):
    llm = lucidlm.LLM.load(directory)
    return llm.finetune(RECORDS, out=out, **(OPTIONS | options))


def logged_losses(out):
    return [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


def checkpoint_step(out):
    return json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]


def crash_at(step):
    def on_step(entry):
        if entry["step"] == step:
            raise KeyboardInterrupt  # the process dies here: no checkpoint of this step
    return on_step


def test_a_checkpoint_every_tenth_of_the_run_by_default(tiny_lm_dir, tmp_path):
    whole = run(tiny_lm_dir, tmp_path / "whole", steps=20)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_lm_dir, tmp_path / "cut", steps=20, on_step=crash_at(7))
    assert checkpoint_step(tmp_path / "cut") == 6  # every 2 steps: the last one before the crash
    resumed = run(tiny_lm_dir, tmp_path / "cut", steps=20, resume=True)
    assert resumed.losses == whole.losses
    with pytest.raises(KeyboardInterrupt):  # save_every=0: only at the end
        run(tiny_lm_dir, tmp_path / "none", steps=20, save_every=0, on_step=crash_at(7))
    assert not (tmp_path / "none" / "checkpoint").exists()


def test_sigint_in_python_checkpoints_the_step_and_raises(tiny_lm_dir, tmp_path):
    previous = signal.getsignal(signal.SIGINT)

    def ctrl_c(entry):
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the step still completes

    with pytest.raises(TrainInterrupted, match=r"after step 3 of 20.*resume=True") as stopped:
        run(tiny_lm_dir, tmp_path / "run", steps=20, save_every=0, on_step=ctrl_c)
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.step == 3
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is restored
    assert checkpoint_step(tmp_path / "run") == 3 and len(logged_losses(tmp_path / "run")) == 3


def test_overwrite_starts_afresh(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = run(tiny_lm_dir, out, steps=3)
    again = run(tiny_lm_dir, out, steps=4, lr=2e-2, overwrite=True)  # another lr: not a resumable run
    assert logged_losses(out) == again.losses and len(again.losses) == 4
    assert again.losses[0] == first.losses[0]  # the same start: nothing of the first run was kept
    assert checkpoint_step(out) == 4 and (out / "adapter_config.json").is_file()
    with pytest.raises(TrainError, match="resume=True and overwrite=True"):
        run(tiny_lm_dir, out, steps=4, resume=True, overwrite=True)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with pytest.raises(SystemExit) as exited:
        main(["finetune", str(data), "--out", str(out), "--resume", "--overwrite"])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint_is_no_dead_end(tiny_lm_dir, tmp_path):
    whole = run(tiny_lm_dir, tmp_path / "whole", steps=6)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_lm_dir, out, steps=6, save_every=0, on_step=crash_at(2))
    assert (out / "log.jsonl").is_file() and not (out / "checkpoint").exists()
    with pytest.raises(TrainError, match=r"stopped before its first checkpoint; pass overwrite=True \(--overwrite\)"):
        run(tiny_lm_dir, out, steps=6)
    with pytest.warns(UserWarning, match="stopped before its first checkpoint: starting again from step 0"):
        resumed = run(tiny_lm_dir, out, steps=6, resume=True)
    assert resumed.losses == whole.losses == logged_losses(out)
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        run(tiny_lm_dir, tmp_path / "never", steps=6, resume=True)


def test_ctrl_c_on_the_command_line_checkpoints_and_resume_finishes(tiny_lm_dir, tmp_path, capsys):
    """A real ``python -m lucidlm finetune`` gets SIGINT after its first logged step: it writes a
    checkpoint of the step it was in, exits 130 saying how to resume, and ``--resume`` finishes the
    run with the losses of an uninterrupted one."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    steps = 150
    argv = ["finetune", str(data), "--model", str(tiny_lm_dir), "--steps", str(steps), "--batch-size", "4",
            "--lr", "1e-2", "--val-split", "0", "--precision", "fp32", "--no-progress", "--save-every", "0"]
    out = tmp_path / "cut"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lucidlm", *argv, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no step was logged"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    stopped = checkpoint_step(out)
    assert 1 <= stopped < steps and len(logged_losses(out)) == stopped
    assert f"interrupted after step {stopped} of {steps}" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    resumed, whole = logged_losses(out), logged_losses(tmp_path / "whole")
    assert len(resumed) == steps
    assert resumed == pytest.approx(whole, rel=1e-5)  # the losses continue where they stopped

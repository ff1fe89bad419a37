"""``torchrun --nproc-per-node 2 -m lucidlm finetune`` (gloo on these CPUs): DDP for LoRA, FSDP2 for
full fine-tuning, DDP for LitGPT's AdapterV2. Two processes with the same global batch follow one process's loss trajectory."""

import json
import os
import subprocess

import pytest

from torchrun_util import TORCHRUN

from lucidlm.cli import main

pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")

RECORDS = [{"messages": [{"role": "user", "content": f"What is {a} times {b}?"},
                         {"role": "assistant", "content": f"{a} times {b} is {a * b}."}]}
           for a in range(4) for b in range(3)]
RECORDS += [{"instruction": "Greet me.", "output": "Hello there!"},
            {"text": "The quick brown fox jumps over the lazy dog. " * 6}]


def losses(out):
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in log if "loss" in e], [e["val_loss"] for e in log if "val_loss" in e]


#: per method: its extra options, and the file its result is
EXTRA = {"lora": ([], "adapter_model.safetensors"), "full": ([], "model.safetensors"),
         "adapter_v2": (["--adapter-start-layer", "0", "--adapter-prompt-length", "4", "--lr", "5e-2"],
                        "lit_model.pth.adapter_v2")}


@pytest.mark.parametrize("method, engine", [("lora", "DDP"), ("full", "FSDP2"), ("adapter_v2", "DDP")])
def test_two_processes_follow_one(method, engine, tiny_lm_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    extra, result = EXTRA[method]
    args = ["finetune", str(data), "--model", str(tiny_lm_dir), "--method", method, "--steps", "4",
            "--batch-size", "4", "--lr", "5e-3", "--precision", "fp32", "--val-split", "0.15",
            "--eval-every", "2", "--no-progress", *extra]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "lucidlm", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one[0]) == 4 and len(one[1]) == 2
    assert two[0] == pytest.approx(one[0], rel=1e-5) and two[1] == pytest.approx(one[1], rel=1e-5)
    assert one[0][-1] < one[0][0]
    assert (tmp_path / "two" / result).is_file()
    assert run.stderr.count("trained 4 steps") == 1  # only rank 0 reports (and writes)


def test_batch_must_split_across_processes(tiny_lm_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "lucidlm", "finetune",
                          str(data), "--model", str(tiny_lm_dir), "--batch-size", "3", "--out", str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "batch_size=3 is the global batch: it must be a multiple of the 2 processes" in run.stderr
    assert not (tmp_path / "o").exists()

"""``lucidlm evaluate MODEL --tasks ... --out DIR``: results.json in the harness's schema with the run's
config, the harness's table on stdout, atomic output; bad input (unknown task, missing include path,
0% / 150% budgets, missing extra) is one line, exit status 2 and nothing in --out. Offline: the
tasks are local (tests/harness_util.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from harness_util import tiny_checkpoint, write_tasks  # noqa: E402

from lucidlm.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def setup(converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_eval")
    return tiny_checkpoint("llama3", converted, root / "tiny"), write_tasks(root / "tasks")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_writes_results_in_the_harness_schema(setup, tmp_path, capsys):
    model, tasks = setup
    out = tmp_path / "run"
    assert main(["evaluate", str(model), "--tasks", "lucid_mc,lucid_gen", "--include-path", str(tasks),
                 "--batch-size", "4", "--out", str(out), "--log-samples"]) == 0
    printed = capsys.readouterr().out
    assert "lucid_mc" in printed and "acc" in printed and "|" in printed  # the harness's table
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["results"]["lucid_mc"]["acc,none"] <= 1
    assert "exact_match,none" in results["results"]["lucid_gen"]
    config = results["config"]
    assert config["model"] == str(model) and config["policy"] is None and config["budget"] is None
    assert config["dtype"] == "float32" and config["adapter"] is None
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples_lucid_gen.jsonl",
                                                     "samples_lucid_mc.jsonl"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_records_the_policy_and_budget(setup, tmp_path, capsys):
    model, tasks = setup
    out = tmp_path / "run"
    assert main(["evaluate", str(model), "--tasks", "lucid_mc", "--include-path", str(tasks), "--limit", "3",
                 "--kv-cache", "snapkv", "--cache-tokens", "50%", "--out", str(out)]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["policy"] == "snapkv" and config["budget"] == "50%"


@pytest.mark.parametrize("argv, says", [
    (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["--tasks", "lucid_mc", "--include-path", "{tmp}/missing"], "missing: no such file or directory"),
    (["--tasks", "lucid_mc", "--cache-tokens", "0%"], "a share must be in (0%, 100%]"),
    (["--tasks", "lucid_mc", "--cache-tokens", "150%"], "a share must be in (0%, 100%]"),
])
def test_bad_input_is_one_line_and_nothing_in_out(argv, says, setup, tmp_path, capsys):
    model, tasks = setup
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--include-path" not in argv:
        argv += ["--include-path", str(tasks)]
    try:
        code = main(["evaluate", str(model), *argv, "--out", str(out)])
    except SystemExit as exc:  # argument types exit from the parser
        code = exc.code
    assert code == 2
    assert says in _one_line(capsys)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_is_one_line(setup, tmp_path, capsys, monkeypatch):
    model, tasks = setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    out = tmp_path / "out"
    assert main(["evaluate", str(model), "--tasks", "lucid_mc", "--include-path", str(tasks), "--out", str(out)]) == 2
    assert "pip install lucidlm[eval]" in _one_line(capsys)
    assert not out.exists()


def test_help_and_argument_errors_import_no_torch(tmp_path):
    code = ("import sys\nfrom lucidlm.cli import main\n"
            "for argv in (['evaluate', '--help'], ['evaluate', 'm', '--tasks', 'a', '--out', 'o', '--cache-tokens',"
            " '0%'], ['faithfulness', '--help'], ['generate', 'hi', '--cache-tokens', '150%']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--include-path DIR" in done.stdout and "--log-samples" in done.stdout
    assert done.stderr.count("error") == 2


def test_bench_kv_tasks_prints_accuracy_per_policy_and_budget(setup, capsys):
    """``lucidlm bench kv --tasks``: one row per policy, budget and metric; the dense row equals the
    harness's own HFLM on the same weights."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tasks = setup
    assert main(["bench", "kv", "--model", str(model), "--tasks", "lucid_mc", "--include-path", str(tasks),
                 "--policies", "window,h2o", "--fractions", "0.5", "--limit", "4"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    table = {(r[0].strip(), r[1].strip(), r[3].strip()): float(r[4]) for r in rows[1:]}
    assert set(table) == {(p, b, m) for p, b in (("dense", "-"), ("window", "50%"), ("h2o", "50%"))
                          for m in ("acc", "acc_norm")}
    oracle = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32,device=cpu", tasks=["lucid_mc"],
                                     limit=4, task_manager=TaskManager(include_path=str(tasks)))
    assert table[("dense", "-", "acc")] == pytest.approx(oracle["results"]["lucid_mc"]["acc,none"], abs=1e-3)


def test_apply_chat_template_matches_the_harness_hflm(setup, tmp_path, capsys):
    """``--apply-chat-template`` through the whole command: the requests are the chat-formatted ones,
    scored as the harness's HFLM scores them on the same weights (and unlike the plain run's)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tasks = setup
    out = tmp_path / "chat"
    assert main(["evaluate", str(model), "--tasks", "lucid_mc", "--include-path", str(tasks), "--limit", "4",
                 "--apply-chat-template", "--log-samples", "--out", str(out)]) == 0
    ours = [json.loads(line) for line in (out / "samples_lucid_mc.jsonl").read_text().splitlines()]
    oracle = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32,device=cpu",
                                     tasks=["lucid_mc"], limit=4, apply_chat_template=True, log_samples=True,
                                     task_manager=TaskManager(include_path=str(tasks)))
    theirs = oracle["samples"]["lucid_mc"]
    assert [s["arguments"] for s in ours] == [[list(a) for a in s["arguments"]] for s in theirs]
    assert "<|im_start|>" in ours[0]["arguments"][0][0]  # the chat template really was applied
    for a, b in zip(ours, theirs):
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)

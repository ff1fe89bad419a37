"""``--adapter DIR`` (and ``--no-check-base``) on generate, chat, explain and evaluate, checked before
anything loads; ``lucidlm merge [--model BASE] ADAPTER OUT_DIR`` with the embedded default; on the
embedded model end to end: fine-tune, merge with no base, load onto its HF conversion."""

import json

import pytest
import torch

pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

import lucidlm  # noqa: E402
from lucidlm.cli import main  # noqa: E402
from lucidlm.train.lora import has_lora  # noqa: E402
from diff_util import save_opened_adapter  # noqa: E402

PROMPT = "What is 2 plus 3?"


@pytest.fixture(scope="module")
def adapter(tiny_lm_dir, tmp_path_factory):
    return save_opened_adapter(tiny_lm_dir, tmp_path_factory.mktemp("adapter"), scale=0.5)


@pytest.mark.parametrize("argv", [
    ["generate", "hi"], ["chat"], ["explain", "hi"], ["evaluate", "--tasks", "x", "--out", "o"],
    ["finetune", "DATA", "--out", "o"], ["serve"]])
def test_a_missing_adapter_is_one_line_before_loading(argv, tmp_path, capsys, model_file):
    argv = [str(model_file) if a == "DATA" else a for a in argv]
    model = [str(model_file)] if argv[0] == "evaluate" else ["--model", str(model_file)]
    assert main([*argv, *model, "--adapter", str(tmp_path / "nope")]) == 2  # model_file would not load
    err = capsys.readouterr().err.strip()
    assert err.endswith("nope: no such file or directory (--adapter)") and len(err.splitlines()) == 1


def test_generate_continues_with_the_adapter(tiny_lm_dir, adapter, capsys):
    tuned = lucidlm.LLM.load(tiny_lm_dir, adapter=adapter)
    expected = tuned.generate(PROMPT, max_new_tokens=6)
    assert expected != lucidlm.LLM.load(tiny_lm_dir).generate(PROMPT, max_new_tokens=6)  # the adapter acts
    assert main(["generate", PROMPT, "--model", str(tiny_lm_dir), "--adapter", str(adapter),
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_explain_explains_the_adapted_model(tiny_lm_dir, adapter, tmp_path):
    from lucidlm.explain.explanation import load_json

    out = tmp_path / "e.json"
    assert main(["explain", PROMPT, "--model", str(tiny_lm_dir), "--adapter", str(adapter), "--target-id", "42",
                 "--json", str(out)]) == 0
    explained = load_json(out.read_text())
    ids = torch.tensor([explained.token_ids])
    logits = {}
    models = {"tuned": lucidlm.LLM.load(tiny_lm_dir, adapter=adapter), "base": lucidlm.LLM.load(tiny_lm_dir)}
    for name, llm in models.items():
        with torch.no_grad():
            logits[name] = llm.model(ids)[0, -1, 42].item()
    assert explained.target_logit == pytest.approx(logits["tuned"], rel=1e-4)
    assert explained.target_logit != pytest.approx(logits["base"], rel=1e-3)


def test_chat_attaches_the_adapter(tiny_lm_dir, adapter, monkeypatch):
    import lucidlm.repl

    seen = {}

    class Recorder:
        def __init__(self, llm, **options):
            seen["llm"] = llm

        def run(self):
            return 0

    monkeypatch.setattr(lucidlm.repl, "Repl", Recorder)
    assert main(["chat", "--model", str(tiny_lm_dir), "--adapter", str(adapter)]) == 0
    assert has_lora(seen["llm"].model)


def test_evaluate_runs_with_the_adapter(converted, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from harness_util import tiny_checkpoint, write_tasks

    model = tiny_checkpoint("llama3", converted, tmp_path / "tiny")
    tasks = write_tasks(tmp_path / "tasks")
    adapter = save_opened_adapter(model, tmp_path / "adapter", scale=0.5)
    scores = {}
    for name, extra in (("base", []), ("tuned", ["--adapter", str(adapter)])):
        out = tmp_path / name
        assert main(["evaluate", str(model), "--tasks", "lucid_mc", "--include-path", str(tasks), "--limit", "4",
                     "--out", str(out), "--log-samples", *extra]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["config"]["adapter"] == (str(adapter) if extra else None)
        scores[name] = [row["resps"] for row in map(json.loads, (out / "samples_lucid_mc.jsonl").open())]
    assert scores["base"] != scores["tuned"]  # the log-likelihoods are the adapted model's


def test_merge_takes_the_base_as_every_command_does(tiny_lm_dir, adapter, tmp_path, capsys):
    from lucidlm.commands.convert import MERGE

    assert main(["merge", "--model", str(tiny_lm_dir), str(adapter), str(tmp_path / "new")]) == 0
    assert main(["merge", str(tiny_lm_dir), str(adapter), str(tmp_path / "old")]) == 0  # the older form
    ids = torch.tensor([[5, 17, 33, 8]])
    with torch.no_grad():
        expected = lucidlm.LLM.load(tiny_lm_dir, adapter=adapter).model(ids)
        for name in ("new", "old"):
            torch.testing.assert_close(lucidlm.LLM.load(tmp_path / name).model(ids), expected, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_lm_dir), str(tiny_lm_dir), str(adapter), str(tmp_path / "x")]) == 2
    assert "the base is given twice" in capsys.readouterr().err
    assert main(["merge", str(adapter)]) == 2
    assert "expected ADAPTER OUT_DIR" in capsys.readouterr().err
    assert MERGE.model(MERGE.parse([str(adapter), "out"])) == ("BASE", None)  # the embedded model


@pytest.mark.slow
def test_on_the_embedded_model_finetune_merge_without_a_base_and_load_onto_its_conversion(tmp_path, capsys):
    """Fine-tune the embedded model a few steps; the adapter records the hub id; ``lucidlm merge
    ADAPTER OUT`` (no base) writes base + adapter; the adapter loads onto ``lucidlm convert`` of the
    GGUF in bfloat16 (another name, another dtype) without --no-check-base; ``lucidlm export
    --adapter`` writes a GGUF file that names the base and holds the tuned weights."""
    records = [{"messages": [{"role": "user", "content": "What is the capital of Zorbania?"},
                             {"role": "assistant", "content": "Quillfax."}]}] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    assert main(["finetune", str(data), "--out", str(run), "--steps", "2", "--batch-size", "2", "--lr", "3e-3",
                 "--val-split", "0", "--precision", "fp32", "--no-progress"]) == 0
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    tuned = lucidlm.LLM.load(adapter=run)
    ids = torch.tensor([tuned.tokenizer.encode_chat([{"role": "user", "content": "Where is Quillfax?"}])])
    with torch.no_grad():
        expected = tuned.model(ids)
        torch.testing.assert_close(lucidlm.LLM.load(tmp_path / "merged").model(ids), expected, rtol=1e-4, atol=1e-3)
        assert not torch.allclose(lucidlm.LLM.load().model(ids), expected, atol=1e-3)  # the adapter acts
    assert main(["convert", str(lucidlm.LLM.load().source), str(tmp_path / "smol-hf"), "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert main(["generate", "Where is Quillfax?", "--model", str(tmp_path / "smol-hf"), "--adapter", str(run),
                 "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    converted = lucidlm.LLM.load(tmp_path / "smol-hf", adapter=run)
    assert converted.hub_id is None and "smollm2" not in str(converted.source).lower()  # only weights vouch
    with torch.no_grad():
        torch.testing.assert_close(converted.model(ids).float(), expected, rtol=0.05, atol=0.3)
    # exported to GGUF with the adapter merged: the file names the base's hub id and holds the tuned weights
    assert main(["export", str(tmp_path / "tuned.gguf"), "--adapter", str(run), "--type", "f16"]) == 0
    exported = lucidlm.LLM.load(tmp_path / "tuned.gguf")
    assert exported.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with torch.no_grad():
        torch.testing.assert_close(exported.model(ids), expected, rtol=0.02, atol=0.1)


def test_help_lists_the_adapter_options():
    from lucidlm.cli import build_parser

    parser = build_parser()
    for command in ("generate", "chat", "explain", "evaluate", "serve", "finetune"):
        sub = parser._subparsers._group_actions[0].choices[command]
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"--adapter", "--no-check-base"} <= flags, command

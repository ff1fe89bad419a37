"""lucidlm diff: argument mistakes answer before anything loads; --adapter and --tuned (a merged
checkpoint) give the API's diff; targets, contrasts and chat prompts; the summary's numbers."""

import copy
import doctest
import json
import re

import pytest
import torch
from cli_probe import probe
from diff_util import make_adapter

import lucidlm
from lucidlm.cli import main
from lucidlm.commands import diff as diff_command
from lucidlm.commands import diff_report as report_command
from lucidlm.explain.diff import ExplanationDiff
from lucidlm.explain.diff_report import adapter_share

pytest.importorskip("peft")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapter(tiny_lm_dir, tmp_path_factory):
    return make_adapter(tiny_lm_dir, tmp_path_factory.mktemp("adapter"), seed=1)


@pytest.fixture(scope="module")
def api_diff(tiny_lm_dir, adapter):
    """The diff of PROMPT made in-process, what the command must write."""
    tuned = lucidlm.LLM.load(tiny_lm_dir, adapter=adapter)
    return tuned.explain_diff(lucidlm.LLM.load(tiny_lm_dir), PROMPT)


def run_diff(capsys, *args):
    code = main(["diff", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def read_diff(path) -> ExplanationDiff:
    return ExplanationDiff.from_dict(json.loads(path.read_text()))


@pytest.mark.parametrize("args, needle", [
    (["diff", "hi", "--base", "{model}"], "one of the arguments --tuned --adapter is required"),
    (["diff", "hi", "--base", "{model}", "--tuned", "{model}", "--adapter", "{tmp}"], "not allowed with argument"),
    (["diff", "hi", "--base", "{model}", "--tuned", "{tmp}/absent"], "argument --tuned: {tmp}/absent does not exist"),
    (["diff", "hi", "--base", "{tmp}/absent", "--tuned", "{model}"], "argument --base: {tmp}/absent does not exist"),
    (["diff", "hi", "--base", "{model}", "--adapter", "{tmp}/none"],
     "{tmp}/none: no such file or directory (--adapter)"),
    (["diff", "", "--tuned", "{model}"], "the prompt is empty"),
    (["diff", "hi", "--tuned", "{model}", "--target", ""], "the target is empty"),
    (["diff", "hi", "--tuned", "{model}", "--json", "{tmp}/no/d.json"], "the directory {tmp}/no does not exist"),
    (["diff", "hi", "--tuned", "{model}", "--png", "{tmp}/no/d.png"], "--png"),
    (["diff", "hi", "--tuned", "{model}", "--method", "occlusion"], "invalid choice: 'occlusion'"),
    (["diff", "hi", "--tuned", "{model}", "--target", "a", "--target-id", "3"], "not allowed with argument --target"),
    (["diff", "hi", "--tuned", "{model}", "--contrast", "x"], "a contrast needs --target or --target-id"),
    (["diff", "hi", "--tuned", "{model}", "--target", "a", "--contrast", ""], "the contrast is empty"),
    (["diff-report", "{tmp}/absent"], "{tmp}/absent: no such file or directory (DIR)"),
    (["diff-report", "{tmp}", "--top", "0"], "argument --top: expected a positive integer"),
    (["diff-report", "{tmp}", "--png", "{tmp}/no/r.png"], "the directory {tmp}/no does not exist"),
])
def test_argument_errors_exit_2_before_anything_loads(args, needle, model_file, tmp_path):
    def fill(text):
        return text.replace("{tmp}", str(tmp_path)).replace("{model}", str(model_file))

    result, stderr = probe(*map(fill, args), watched=model_file)
    lines = stderr.strip().splitlines()
    assert result["status"] == 2 and len(lines) == 1 and fill(needle) in lines[0], stderr
    assert lines[0].startswith("lucidlm")
    assert result["opened"] == [] and result["heavy"] == []


@pytest.mark.parametrize("argv", [["diff", "--help"], ["diff-report", "--help"]])
def test_help_imports_no_torch(argv):
    result, _ = probe(*argv)
    assert result["status"] == 0 and result["heavy"] == []


def test_adapter_diff_is_the_apis_and_the_summary_says_its_numbers(tiny_lm_dir, adapter, api_diff, tmp_path,
                                                                     capsys):
    out = run_diff(capsys, PROMPT, "--base", tiny_lm_dir, "--adapter", adapter, "--json", tmp_path / "d.json")
    written = read_diff(tmp_path / "d.json")
    assert written.tuned.target_ids == api_diff.tuned.target_ids == written.base.target_ids
    assert written.tuned.prompt == PROMPT and written.tuned.method == "cp-lrp"
    torch.testing.assert_close(written.relevance, api_diff.relevance, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(written.adapter_relevance, api_diff.adapter_relevance, rtol=1e-5, atol=1e-7)
    assert written.logit_delta == pytest.approx(api_diff.logit_delta, rel=1e-5)
    assert written.tuned.layers is not None and written.components("heads", top=1)  # for diff-report

    first, second = out.splitlines()[:2]
    numbers = re.search(r"base (\S+), tuned (\S+), change (\S+); adapter share (\S+)%", first)
    assert numbers, first
    base, tuned, change, share = map(float, numbers.groups())
    assert base == pytest.approx(written.base.target_logit, rel=1e-3)
    assert tuned == pytest.approx(written.tuned.target_logit, rel=1e-3)
    assert change == pytest.approx(written.logit_delta, rel=1e-3)
    assert share == pytest.approx(100 * adapter_share(written), abs=0.06) and 0 < share <= 100
    change = written.relevance.tolist()
    ranked = sorted(range(len(change)), key=lambda i: -abs(change[i]))[:5]
    assert second.startswith("tokens changed most: ")
    assert [repr(written.tokens[i]) for i in ranked] == re.findall(r"('[^']*') [+-]", second)


def test_a_merged_checkpoint_as_tuned_gives_the_same_tuned_relevance(tiny_lm_dir, adapter, api_diff, tmp_path,
                                                                      capsys):
    lucidlm.LLM.load(tiny_lm_dir, adapter=adapter).save(tmp_path / "merged")  # save() merges the adapter
    out = run_diff(capsys, PROMPT, "--base", tiny_lm_dir, "--tuned", tmp_path / "merged", "--json", tmp_path / "m.json")
    merged = read_diff(tmp_path / "m.json")
    assert merged.adapter_relevance is None and "adapter share" not in out
    assert merged.tuned.target_ids == api_diff.tuned.target_ids
    torch.testing.assert_close(merged.tuned.relevance, api_diff.tuned.relevance, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(merged.base.relevance, api_diff.base.relevance, rtol=1e-6, atol=1e-8)


def test_targets_contrasts_and_chat(tiny_lm_dir, adapter, tmp_path, capsys):
    tokenizer = lucidlm.LLM.load(tiny_lm_dir).tokenizer
    paris, london = (tokenizer.encode(t)[-1] for t in (" Paris", " London"))
    common = ["--base", tiny_lm_dir, "--adapter", adapter, "--json", tmp_path / "d.json"]
    out = run_diff(capsys, PROMPT, "--target", " Paris", "--contrast", " London", *common)
    d = read_diff(tmp_path / "d.json")
    assert d.base.target_ids == d.tuned.target_ids == [paris, london]
    assert d.tuned.score_label == "logit difference" and "(cp-lrp, logit difference)" in out
    run_diff(capsys, PROMPT, "--target-id", "42", "--contrast-id", "43", "--method", "attnlrp", *common)
    d = read_diff(tmp_path / "d.json")
    assert d.tuned.target_ids == [42, 43] and d.base.method == d.tuned.method == "attnlrp"
    run_diff(capsys, "Name a colour.", "--chat", "--target-id", "42", *common)
    d = read_diff(tmp_path / "d.json")
    assert tokenizer.decode(d.tuned.token_ids).endswith("<|im_start|>assistant\n")
    assert d.tuned.token_ids == d.base.token_ids and d.tuned.target_ids == [42]


def test_an_adapter_at_its_initial_state_changes_nothing(tiny_lm_dir, tmp_path, capsys):
    zero = make_adapter(tiny_lm_dir, tmp_path / "zero", scale=0.0)
    out = run_diff(capsys, PROMPT, "--base", tiny_lm_dir, "--adapter", zero, "--json", tmp_path / "z.json")
    d = read_diff(tmp_path / "z.json")
    assert d.relevance.abs().max() == 0 and d.adapter_relevance.abs().max() == 0 and d.logit_delta == 0
    assert "change +0; adapter share 0.0%" in out


@pytest.mark.skipif(not all(hasattr(ExplanationDiff, m) for m in ("to_terminal", "save_html", "save_png")),
                    reason="ExplanationDiff.to_terminal/save_html/save_png (the diff renderings) are not on this "
                           "branch")
def test_terminal_html_and_png(tiny_lm_dir, adapter, tmp_path, capsys):
    out = run_diff(capsys, PROMPT, "--base", tiny_lm_dir, "--adapter", adapter)
    assert out.startswith("target ") and len(out.splitlines()) > 2  # the summary, then the three rows
    run_diff(capsys, PROMPT, "--base", tiny_lm_dir, "--adapter", adapter, "--html", tmp_path / "d.html",
             "--png", tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (tmp_path / "d.html").read_text().lower()


def test_the_embedded_model_with_an_adapter(smollm2, tmp_path, capsys):
    """lucidlm diff end to end on the embedded model (the default --base)."""
    from lucidlm.train.lora import attach_lora, lora_layers, save_adapter

    model = copy.deepcopy(smollm2.model)
    attach_lora(model, r=2, alpha=4, targets=["q_proj", "v_proj"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * 0.05)
    save_adapter(model, tmp_path / "adapter", base_model=smollm2.source)
    out = run_diff(capsys, PROMPT, "--adapter", tmp_path / "adapter", "--target", " Paris",
                   "--json", tmp_path / "d.json")
    d = read_diff(tmp_path / "d.json")
    assert d.tuned.target == " Paris" and len(d.tokens) == 5 and d.adapter_relevance is not None
    assert d.logit_delta != 0 and "adapter share" in out
    assert d.base.target_logit == pytest.approx(smollm2.explain(PROMPT, target=" Paris", method="cp-lrp").target_logit,
                                                rel=1e-4)


def test_doctests():
    for module in (diff_command, report_command):
        assert doctest.testmod(module).failed == 0

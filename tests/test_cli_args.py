"""The command line answers at once: help, the catalogue and argument mistakes import no torch and open
no model file. (Wall-clock times: scripts/cli_startup.py; tests assert what is imported and opened.)"""

import argparse
import doctest
import pathlib
import subprocess
import sys

import pytest
from cli_probe import probe

from lucidlm.cli import build_parser, check_args


def test_importing_the_cli_and_lucidlm_imports_no_torch():
    code = ("import sys, lucidlm, lucidlm.cli, lucidlm.repl, lucidlm.methods, lucidlm.cache.spec, "
            "lucidlm.bench.args; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_lucidlm_names_stay_importable():
    """Each public name resolves (lazily, PEP 562) to what the README and docs say it is."""
    import dataclasses
    import importlib
    import inspect
    import tomllib

    import torch

    import lucidlm
    from lucidlm import GPT, LLM, Config, Family, LucidError, explain, hf, register_config, register_family, rules

    unresolved = [name for name in lucidlm.__all__ if not hasattr(lucidlm, name)]
    assert unresolved == []
    assert rules is importlib.import_module("lucidlm.model.rules")  # "rules.py (public as lucidlm.rules)"
    assert all(callable(getattr(rules, helper)) for helper in
               ("activation", "product", "normalizer", "attention_weights", "bilinear"))
    assert issubclass(GPT, torch.nn.Module) and dataclasses.is_dataclass(Config) and dataclasses.is_dataclass(Family)
    assert list(inspect.signature(LLM.load).parameters)[:2] == ["path", "adapter"]  # LLM.load(path, adapter)
    assert callable(register_config) and callable(register_family) and issubclass(LucidError, Exception)
    assert callable(explain.check) and callable(hf.explainable) and lucidlm.api.LLM is LLM
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert lucidlm.__version__ == pyproject["project"]["version"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lucidlm.nope  # noqa: B018


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["bench", "--help"], ["explain", "--help"],
                                  ["chat", "--help"], ["bench", "kv", "--help"], ["serve", "--help"]])
def test_help_and_models_import_no_torch(argv):
    result, _ = probe(*argv)
    assert result["status"] in (0, None) and result["heavy"] == []


@pytest.mark.parametrize("args, needle", [
    (["generate", "--kv-cache", "foo", "x"], "'foo' is not a KV-cache policy; valid: dense, window"),
    (["generate", ""], "the prompt is empty"),
    (["explain", ""], "the prompt is empty"),
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--top-p", "0"], "--top-p: expected a probability in (0, 1]"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p"),
    (["chat", "--top-k", "0"], "--top-k"),
    (["explain", "hi", "--method", "shap"], "invalid choice: 'shap'"),
    (["explain", "hi", "--target", "a", "--target-id", "3"], "not allowed with argument --target"),
    (["explain", "hi", "--target-id", "-1"], "--target-id"),
    (["explain", "hi", "--target", ""], "the target is empty"),
    (["explain", "hi", "--html", "{tmp}/no/such/dir/e.html"], "the directory {tmp}/no/such/dir does not exist"),
    (["explain", "hi", "--png", "{tmp}/no/e.png"], "--png"),
    (["explain", "hi", "--json", "{tmp}/no/e.json"], "--json"),
    (["finetune", "{tmp}/missing.jsonl", "--out", "{tmp}/run"], "missing.jsonl: no such file"),
    (["finetune", "{tmp}/missing.jsonl", "--out", "{tmp}/run", "--lr", "0"], "--lr"),
    (["finetune", "{tmp}/missing.jsonl", "--out", "{tmp}/run", "--val-split", "1"], "--val-split"),
    (["view", "{tmp}/missing.json"], "missing.json: no such file"),
    (["serve", "--port", "70000"], "--port"),
])
def test_argument_errors_exit_2_before_the_model_is_opened(args, needle, model_file, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    needle = needle.replace("{tmp}", str(tmp_path))
    result, stderr = probe(*args, "--model", model_file, watched=model_file)
    assert result["status"] == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("lucidlm "), stderr
    assert result["opened"] == [] and result["heavy"] == []


def test_a_missing_model_path_is_named(tmp_path):
    result, stderr = probe("generate", "hi", "--model", tmp_path / "absent-model")
    assert result["status"] == 2 and result["heavy"] == []
    assert f"argument --model: {tmp_path / 'absent-model'} does not exist" in stderr
    result, stderr = probe("merge", tmp_path / "absent-base", tmp_path, tmp_path / "out")
    assert result["status"] == 2 and "absent-base does not exist" in stderr


def test_cache_tokens_alone_picks_the_window_policy_with_a_note():
    """check_args fills in the policy the command then runs with (tests/test_cli.py generates with it)."""
    args = build_parser().parse_args(["generate", "hi", "--cache-tokens", "64"])
    notes = check_args(args)
    assert len(notes) == 1 and "window" in notes[0] and "--kv-cache" in notes[0]
    assert (args.kv_cache, args.cache_tokens) == ("window", 64)
    args = build_parser().parse_args(["generate", "hi", "--kv-cache", "h2o+int8", "--cache-tokens", "64"])
    assert check_args(args) == [] and (args.kv_cache, args.cache_tokens) == ("h2o+int8", 64)
    args = build_parser().parse_args(["generate", "hi"])
    assert check_args(args) == [] and (args.kv_cache, args.cache_tokens) == (None, None)


def test_target_id_is_an_integer_and_target_stays_text():
    args = build_parser().parse_args(["explain", "hi", "--target-id", "7042"])
    assert args.target_id == 7042 and args.target is None
    args = build_parser().parse_args(["explain", "hi", "--target", "7042"])
    assert args.target == "7042" and args.target_id is None


def parsers(parser, path=("lucidlm",)):
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


ALL_PARSERS = dict(parsers(build_parser()))


@pytest.mark.parametrize("name", sorted(ALL_PARSERS))
def test_every_option_shows_its_default_and_help_has_no_rst(name):
    parser = ALL_PARSERS[name]
    formatter = parser._get_formatter()
    chosen = {a for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}
    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS or action.required or action in chosen
                or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))):
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert "default" in text, f"{name} {action.option_strings[0]}: help does not say its default: {text!r}"
    assert "`" not in parser.format_help(), f"{name} --help shows RST markup"


def test_bench_help_lists_one_line_per_bench():
    from lucidlm.bench.args import BENCHES

    text = " ".join(ALL_PARSERS["lucidlm bench"].format_help().split())  # argparse wraps the lines
    for name, (_, line, _) in BENCHES.items():
        assert f" {name} {line} " in text, name
    assert "--cache-tokens N      KV-cache budget in tokens per layer (default: the" in \
        ALL_PARSERS["lucidlm generate"].format_help()


def test_the_bench_modules_use_the_torch_free_options():
    import importlib

    from lucidlm.bench.args import BENCHES

    for module, _, add in BENCHES.values():
        assert importlib.import_module(module).add_arguments is add


def test_one_list_of_methods_and_policies():
    from lucidlm import cache, methods
    from lucidlm.cache import spec
    from lucidlm.cache.quant import STORES
    from lucidlm.model import rules

    assert rules.METHODS is methods.METHODS
    assert list(cache.POLICIES) == list(spec.POLICY_NAMES)
    assert set(cache._EVICTION) == set(spec.EVICTIONS) and set(STORES) == set(spec.QUANTS)
    assert cache.DEFAULT_CACHE_TOKENS == spec.DEFAULT_CACHE_TOKENS


def test_doctests():
    import lucidlm.bench.args
    import lucidlm.cache.spec
    import lucidlm.repl

    for module in (lucidlm.cache.spec, lucidlm.repl, lucidlm.bench.args):
        assert doctest.testmod(module).failed == 0

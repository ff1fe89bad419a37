"""Activation checkpointing (lucidlm.model.checkpointing): a checkpointed explanation recomputes each
block in the backward under the rules the forward had, so its relevances (token and latent) equal
the plain run's; the explanation holds nothing of size tokens²; fine-tuning with checkpointing
gives the plain run's loss and gradients. The oracle is the plain (un-checkpointed) run, which
tests/test_explain*.py check against LXT and the conservation identities."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointError, checkpoint

import lucidlm
from lucidlm import GPT, Config
from lucidlm.explain.core import Pass, explain_mode, token_inputs
from lucidlm.explain.explainer import explain, explain_generation
from lucidlm.model import attention
from lucidlm.model import gpt as gpt_module
from lucidlm.model.checkpointing import checkpointing, recomputing
from lucidlm.train.data import IGNORE
from lucidlm.train.loop import summed_loss
from test_explain import load

#: dense GQA, sliding window, soft-capping, gpt-oss sinks + MoE, MLA, two MoE routers
FAMILIES = ["smollm2", "mistral", "gemma2", "gpt-oss", "deepseek-v3", "mixtral", "qwen3-moe"]
METHODS = ["attnlrp", "cp-lrp"]


def prompt(model, n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointed_relevances_equal_the_plain_run(family, method, hf_checkpoint):
    model = load(hf_checkpoint, family, dtype=torch.float64)
    ids = prompt(model, 40)
    plain = explain(model, None, ids, method=method, layers="all")
    with checkpointing():
        saved = explain(model, None, ids, method=method, layers="all")
    torch.testing.assert_close(saved.relevance, plain.relevance, rtol=1e-12, atol=1e-14)
    assert saved.layers.keys() == plain.layers.keys()
    for key in plain.layers:
        torch.testing.assert_close(saved.layers[key], plain.layers[key], rtol=1e-12, atol=1e-14)


def _gradient_outside_the_rules(model, ids) -> torch.Tensor:
    """Forward under AttnLRP's rules, backward after leaving them (as a GPU's autograd threads,
    which do not see the caller's ContextVars, would run it)."""
    _, positions = token_inputs(model, [ids])
    with explain_mode("attnlrp"):
        run = Pass.forward(model, positions, ids=torch.tensor([ids]))
    grad, _ = run.gradients(run.logits[0, -1, 3])
    return run.relevance(grad)


def test_the_recompute_runs_under_the_forwards_rules_even_where_they_are_not_in_force(monkeypatch):
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).double().eval()
    ids = prompt(model, 24)
    plain = _gradient_outside_the_rules(model, ids)
    with checkpointing():
        saved = _gradient_outside_the_rules(model, ids)
    torch.testing.assert_close(saved, plain, rtol=1e-12, atol=1e-14)
    # the same checkpoint without re-entering the rules recomputes plain blocks, which save other
    # tensors than the forward did: torch refuses the backward, so the equality above is the rules' doing
    monkeypatch.setattr(gpt_module, "run_block",
                        lambda block, *args: checkpoint(block, *args, use_reentrant=False))
    with checkpointing(), pytest.raises(CheckpointError, match="recomputed"):
        _gradient_outside_the_rules(model, ids)


def test_checkpointed_generation_explanations_equal_the_plain_ones():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).double().eval()
    ids = prompt(model, 12)
    plain = explain_generation(model, None, ids, max_new_tokens=3)
    with checkpointing():
        saved = explain_generation(model, None, ids, max_new_tokens=3)
    assert saved.generated_ids == plain.generated_ids and len(plain.generated_ids) == 3
    assert plain.matrix.abs().sum() > 0
    torch.testing.assert_close(saved.matrix, plain.matrix, rtol=1e-12, atol=1e-14)


def test_recomputing_is_off_outside_a_recompute():
    assert not recomputing()


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operator makes (forward, recompute and backward: on the
    CPU autograd runs the backward in the calling thread, inside this mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def largest_tensor(model, ids, method: str) -> tuple[int, str]:
    mode = LargestTensor()
    with mode, checkpointing():
        explain(model, None, ids, method=method)
    return mode.largest, mode.op


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["smollm2", "qwen3-moe", "mistral", "gemma2", "gpt-oss", "deepseek-v3"])
def test_a_checkpointed_explanation_makes_no_tensor_of_tokens_squared(family, method, hf_checkpoint, monkeypatch):
    """Doubling the prompt at most doubles the largest tensor any operator makes, forward,
    recompute and backward (a tokens² tensor would quadruple it). Sliding windows (a mask),
    soft-capping (the explicit kernel), sinks (a float mask) and MLA (SDPA's math kernel) attend
    in chunks of queries past QUERY_CHUNK (here 64, so that short prompts show it)."""
    monkeypatch.setattr(attention, "QUERY_CHUNK", 64)
    model = load(hf_checkpoint, family)
    ids = prompt(model, 512)
    small, _ = largest_tensor(model, ids[:256], method)
    large, op = largest_tensor(model, ids, method)
    assert large <= 2 * small, (small, large, op)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt-oss", "deepseek-v3"])
def test_attention_in_chunks_of_queries_equals_one_pass(family, method, hf_checkpoint, monkeypatch):
    """The oracle is the unchunked kernel (checked against LXT and transformers elsewhere)."""
    model = load(hf_checkpoint, family, dtype=torch.float64)
    ids = prompt(model, 50)
    whole = explain(model, None, ids, method=method, layers="all")
    chunks = []
    chunk = attention.CausalSelfAttention._chunk
    monkeypatch.setattr(attention.CausalSelfAttention, "_chunk", lambda *a: chunks.append(1) or chunk(*a))
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    for checkpointed in (False, True):
        chunks.clear()
        with checkpointing(checkpointed):
            parts = explain(model, None, ids, method=method, layers="all")
        assert len(chunks) >= 4 * model.config.n_layer  # 4 chunks a layer, and their recomputes
        torch.testing.assert_close(parts.relevance, whole.relevance, rtol=1e-12, atol=1e-14)
        for key in whole.layers:
            torch.testing.assert_close(parts.layers[key], whole.layers[key], rtol=1e-12, atol=1e-14)


def test_logits_are_computed_for_the_scored_rows_only():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).eval()
    rows = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[:-1].numel()))
    try:
        explain(model, None, prompt(model, 64), target=5)  # the next token: the last position only
        explain(model, None, prompt(model, 64), target=[5, 6, 7])  # a continuation: its 3 positions
    finally:
        handle.remove()
    assert rows == [1, 3]


def test_training_with_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).double().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = summed_loss(model, ids, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain = loss_and_grads()
    with checkpointing():
        saved_loss, saved = loss_and_grads()
    torch.testing.assert_close(saved_loss, plain_loss, rtol=1e-12, atol=0)
    for name, grad in plain.items():
        torch.testing.assert_close(saved[name], grad, rtol=1e-10, atol=1e-14, msg=name)


def test_finetune_with_checkpointing_gives_the_same_losses(hf_checkpoint, tmp_path):
    from test_family_finetune import OPTIONS, TEXTS, with_tokenizer

    _, directory = hf_checkpoint("smollm2")
    model_dir = with_tokenizer(directory, tmp_path / "model")
    plain = lucidlm.LLM.load(model_dir).finetune(TEXTS, method="lora", **{**OPTIONS, "steps": 3})
    saved = lucidlm.LLM.load(model_dir).finetune(TEXTS, method="lora", checkpointing=True, **{**OPTIONS, "steps": 3})
    torch.testing.assert_close(torch.tensor(saved.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)


@pytest.mark.parametrize("argv", [["explain", "hi"], ["explain-dataset", "d.jsonl", "--out", "o"],
                                  ["finetune", "d.jsonl", "--out", "o"]])
def test_checkpointing_flag_on_explain_explain_dataset_and_finetune(argv):
    from lucidlm.cli import build_parser

    assert build_parser().parse_args(argv).checkpointing is False
    assert build_parser().parse_args(argv + ["--checkpointing"]).checkpointing is True


def test_the_checkpointing_flag_reaches_llm_explain(monkeypatch, capsys):
    from lucidlm.cli import build_parser
    from lucidlm.commands import explain as command

    seen = {}

    class FakeLLM:
        def explain(self, prompt, **kwargs):
            seen.update(kwargs)
            return StubExplanation()

    class StubExplanation:
        def to_terminal(self, skip_first):
            return "heatmap"

    command._explain(FakeLLM(), "hi", None, build_parser().parse_args(["explain", "hi", "--checkpointing"]))
    assert seen["checkpointing"] is True and capsys.readouterr().out.strip() == "heatmap"


def test_checkpointing_with_a_kv_cache_replay_is_refused():
    from lucidlm.errors import ExplainError

    llm = lucidlm.LLM.from_config("tiny-llama")
    with pytest.raises(ExplainError, match="checkpointing=True with kv_cache='h2o'"):
        llm.explain([1, 5, 7, 9], kv_cache="h2o", checkpointing=True)


def test_checkpointed_training_backward_in_another_thread_equals_plain(hf_checkpoint, monkeypatch):
    """A GPU's autograd runs the backward in threads of its own, which see none of the caller's
    ContextVars: the recompute must re-enter the forward's checkpointing (the chunked attention of
    a soft-capped model decides by it whether to keep its chunks)."""
    import threading

    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    model = load(hf_checkpoint, "gemma2", dtype=torch.float64).train()
    ids = torch.tensor([prompt(model, 48)])
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with checkpointing(checkpointed):
            loss = summed_loss(model, ids, labels)
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
        return [p.grad.clone() for p in model.parameters()]

    plain, saved = grads(False), grads(True)
    for a, b in zip(saved, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_bench_explain_checkpointing_measures_each_cell_in_its_own_child(monkeypatch, capsys):
    import argparse

    from lucidlm.bench import explain as bench_explain

    commands = []

    def child(cmd, env=None):
        commands.append(cmd)
        checkpointed = "--checkpointing" in cmd
        return {"seconds": 3.0 if checkpointed else 2.0, "peak_mib": 10.0 if checkpointed else 40.0,
                "process_peak_mib": 900.0 if checkpointed else 930.0, "threads": 1}

    monkeypatch.setattr(bench_explain, "run_child", child)
    monkeypatch.setattr("lucidlm.bench.explain_tokens.prepare_model", lambda model: None)
    parser = argparse.ArgumentParser()
    bench_explain.add_arguments(parser)
    args = parser.parse_args(["--checkpointing", "--lengths", "16,32", "--methods", "attnlrp", "--repeats", "0"])
    assert bench_explain.run(args) == 0
    assert ["--checkpointing" in c for c in commands] == [False, True, False, True]
    rows = [line.replace("|", "").split() for line in capsys.readouterr().out.splitlines()[-2:]]
    assert rows == [["attnlrp", n, "2.0", "930", "40", "3.0", "900", "10", "0.25×", "1.50×"] for n in ("16", "32")]

"""Several targets of one text in one forward and one batched backward (lucidlm.explain.multi):
each explanation equals the one-target explain() of the text cut after its position (the
reference), for every rule method, several families, latent relevances and every batch size; the
rules' vmap rules equal the plain backward; and the backward really is batched."""

import json

import pytest
import torch
from cli_probe import probe

import lucidlm
from lucidlm import GPT, Config, rules
from lucidlm.errors import ExplainError
from lucidlm.explain import multi
from lucidlm.explain.explainer import explain, explain_generation
from lucidlm.explain.multi import explain_positions

TEXT = [1, 17, 42, 5, 63, 8, 29, 77, 11, 40, 2, 90]
TOL = 1e-5


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def assert_same(got, alone) -> None:
    """Equal within TOL (relative L2; the sequence is longer than the one-target run's, so matmuls
    round differently), the score likewise, and the rest exactly."""
    assert rel_l2(got.relevance, alone.relevance) < TOL
    assert got.target_logit == pytest.approx(alone.target_logit, rel=TOL, abs=TOL)
    for field in ("tokens", "token_ids", "target", "target_ids", "method", "score_label"):
        assert getattr(got, field) == getattr(alone, field), field
    if alone.layers is not None:
        assert sorted(got.layers) == sorted(alone.layers)
        for key, value in alone.layers.items():
            assert rel_l2(got.layers[key], value) < TOL, key


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()


@pytest.mark.parametrize("batch_size", [None, 1, 3])
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "inputxgrad"])
def test_positions_equal_one_at_a_time(tiny, method, batch_size):
    got = explain_positions(tiny, None, TEXT, method=method, batch_size=batch_size)
    assert len(got) == len(TEXT) - 1
    for p, e in enumerate(got):
        assert_same(e, explain(tiny, None, TEXT[:p + 1], target=TEXT[p + 1], method=method))


def test_given_targets_and_positions(tiny):
    positions = [-1, 3, 3, 0]  # any order, repeats, negative indices
    targets = [None, (7, 12), 50, 9]
    got = explain_positions(tiny, None, TEXT, positions=positions, targets=targets, batch_size=2)
    for p, target, e in zip([11, 3, 3, 0], targets, got):
        assert_same(e, explain(tiny, None, TEXT[:p + 1], target=target))
    assert got[0].target_ids == [int(explain(tiny, None, TEXT).target_ids[0])]  # the top token after the last
    assert got[1].score_label == "logit difference"


def test_latent_relevances_per_target(tiny):
    got = explain_positions(tiny, None, TEXT, positions=[4, 9], layers="all", batch_size=None)
    for p, e in zip([4, 9], got):
        assert_same(e, explain(tiny, None, TEXT[:p + 1], target=TEXT[p + 1], layers="all"))


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "mixtral", "qwen3"])  # learned positions, softcap, experts
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_other_families(family, method, hf_checkpoint):
    model = lucidlm.LLM.load(hf_checkpoint(family)[1]).model.eval()
    got = explain_positions(model, None, TEXT, positions=[2, 6, 10], method=method, layers=[-1])
    for p, e in zip([2, 6, 10], got):
        assert_same(e, explain(model, None, TEXT[:p + 1], target=TEXT[p + 1], method=method, layers=[-1]))


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_generation_batch_sizes_equal_the_loop(tiny, batch_size):
    """Every batch size gives explain()'s row for each generated token (the generation's own test
    in test_explain.py checks the default against it for three families)."""
    g = explain_generation(tiny, None, TEXT[:5], max_new_tokens=4, batch_size=batch_size)
    seq = TEXT[:5] + g.generated_ids
    for i, token in enumerate(g.generated_ids):
        alone = explain(tiny, None, seq[:5 + i], target=token)
        assert rel_l2(g.matrix[i, :5 + i], alone.relevance) < TOL
        assert (g.matrix[i, 5 + i:] == 0).all()


@pytest.mark.parametrize(("batch_size", "calls"), [(None, 1), (2, 3), (1, 5)])
def test_one_backward_per_chunk(tiny, monkeypatch, batch_size, calls):
    """The point of it: 5 targets are one backward through the blocks (batched over them), not
    five; before it, one plain backward through the head (norm and vocabulary projection) for
    all of them."""
    seen = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        seen.append(kwargs.get("is_grads_batched", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(multi.torch.autograd, "grad", counting)
    explain_positions(tiny, None, TEXT, positions=[1, 3, 5, 7, 9], batch_size=batch_size)
    assert seen == [False] + [batch_size != 1] * calls


def test_rules_have_vmap_rules():
    """A backward batched over two seeds equals two plain backwards through each rule."""
    x = torch.tensor([1.5, -2.0, 0.0, 3.0], requires_grad=True)
    switch = rules.BranchSwitch()
    for method in ("attnlrp", "cp-lrp"):
        with rules.explaining(method):
            gated = rules.product(rules.activation(torch.nn.functional.silu, x), x * 2)
            out = rules.bilinear(gated) + rules.switched_branch(x * x, switch)
        seeds = torch.tensor([[1.0, 0, 2, 0], [0, 1, 0, -1]])
        (batched,) = torch.autograd.grad(out, x, seeds, retain_graph=True, is_grads_batched=True)
        for seed, row in zip(seeds, batched):
            (alone,) = torch.autograd.grad(out, x, seed, retain_graph=True)
            torch.testing.assert_close(row, alone)


def test_bad_input(tiny):
    with pytest.raises(ExplainError, match="positions: 12 is not a token index of this 12-token text"):
        explain_positions(tiny, None, TEXT, positions=[12])
    with pytest.raises(ExplainError, match=r"positions=\[\]"):
        explain_positions(tiny, None, TEXT, positions=[])
    with pytest.raises(ExplainError, match="positions: 1.5 is not a token index"):
        explain_positions(tiny, None, TEXT, positions=[1.5])
    with pytest.raises(ExplainError, match="has one token: pass positions=\\[0\\]"):
        explain_positions(tiny, None, [5])
    with pytest.raises(ExplainError, match=r"targets: expected one per position \(2\), got 1"):
        explain_positions(tiny, None, TEXT, positions=[1, 2], targets=[3])
    with pytest.raises(ExplainError, match="is a continuation of 2 tokens"):
        explain_positions(tiny, None, TEXT, positions=[1], targets=[[3, 4]])
    with pytest.raises(ExplainError, match="batch_size=0"):
        explain_positions(tiny, None, TEXT, batch_size=0)
    with pytest.raises(ExplainError, match="batch_size=0"):
        explain_generation(tiny, None, TEXT, max_new_tokens=2, batch_size=0)
    with pytest.raises(ExplainError, match="method='occlusion'"):
        explain_positions(tiny, None, TEXT, method="occlusion")


def test_the_real_model(converted):
    llm = lucidlm.LLM.load(converted)
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = llm.tokenizer.encode(text)
    got = llm.explain_positions(text, positions=[5, -2], batch_size=None)
    for p, e in zip([5, len(ids) - 2], got):
        assert_same(e, llm.explain(ids[:p + 1], target=ids[p + 1]))
    assert got[0].prompt is None and got[0].tokens == [llm.tokenizer.decode([i]) for i in ids[:6]]


# --------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("args, needle", [
    (["--generate", "3", "--target", " x"], "--generate explains the tokens it generates: drop --target"),
    (["--positions", "all", "--target-id", "5"], "--positions explains the token that follows each position: drop "
                                                 "--target-id"),
    (["--generate", "3", "--kv-cache", "window"], "drop --kv-cache"),
    (["--positions", "1", "--cache-tokens", "8"], "drop --cache-tokens"),
    (["--generate", "3", "--method", "occlusion"], "takes a rule method (attnlrp, cp-lrp, inputxgrad)"),
    (["--positions", "1", "--html", "{tmp}/e.html"], "--positions writes --json"),
    (["--batch-size", "2"], "--batch-size applies to --generate or --positions"),
    (["--generate", "3", "--positions", "1"], "not allowed with argument --generate"),
    (["--generate", "0"], "--generate: expected a positive integer"),
    (["--positions", "1,x"], "expected 'all' or comma-separated token indices, got '1,x'"),
    (["--generate", "2", "--batch-size", "0"], "--batch-size: expected a positive integer"),
])
def test_cli_refusals_exit_2_before_the_model_is_opened(args, needle, model_file, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result, stderr = probe("explain", "hi", *args, "--model", model_file, watched=model_file)
    lines = stderr.strip().splitlines()
    assert result["status"] == 2 and len(lines) == 1 and needle in lines[0], stderr
    assert result["opened"] == [] and result["heavy"] == []


def test_cli_runs_the_batched_path(converted, tmp_path, capsys, monkeypatch):
    """``explain --generate`` / ``--positions`` write what explain_generation / explain_positions
    give, and go through one batched backward."""
    from lucidlm.cli import main
    from lucidlm.explain.explanation import Explanation, GenerationExplanation

    batched = []
    real = multi.batched_backward

    def spy(*args, **kwargs):
        batched.append(kwargs.get("batch_size"))
        yield from real(*args, **kwargs)

    monkeypatch.setattr(multi, "batched_backward", spy)
    monkeypatch.setattr("lucidlm.explain.explainer.batched_backward", spy)
    out = tmp_path / "g.json"
    assert main(["explain", "One, two, three,", "--model", str(converted), "--generate", "3", "--json", str(out),
                 "--batch-size", "2"]) == 0
    g = GenerationExplanation.from_json(out.read_text())
    llm = lucidlm.LLM.load(converted)
    expected = llm.explain_generation("One, two, three,", max_new_tokens=3)
    assert g.generated_ids == expected.generated_ids
    torch.testing.assert_close(g.matrix, expected.matrix, atol=1e-5, rtol=1e-4)
    out = tmp_path / "p.json"
    assert main(["explain", "One, two, three,", "--model", str(converted), "--positions=-2,1", "--json",
                 str(out)]) == 0
    got = [Explanation.from_dict(d) for d in json.loads(out.read_text())]
    for e, alone in zip(got, llm.explain_positions("One, two, three,", positions=[-2, 1])):
        assert_same(e, alone)
    assert batched == [2, 8, 8, 8]  # --batch-size 2, then the default
    assert "generated token(s)" in capsys.readouterr().out


def test_a_model_without_final_norm_is_refused():
    model = GPT(Config.from_name("tiny-llama")).eval()
    model.final_norm = None
    with pytest.raises(ExplainError, match="GPT has no final_norm module"):
        explain_positions(model, None, TEXT, positions=[3])

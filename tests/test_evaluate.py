"""lucidlm.evaluate: every faithfulness metric against curves computed by hand on a toy model whose
score is a known linear function of which tokens are present; batching equals one prompt at a
time on a real GPT; every input form gives the same result; the ``lucidlm faithfulness`` command."""

from __future__ import annotations

import doctest
import itertools
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import lucidlm
from lucidlm.errors import ExplainError
from lucidlm.evaluate import METRICS, FaithfulnessResult, faithfulness
from lucidlm.explain.explainer import explain

V, TARGET, OTHER = 8, 5, 6
WEIGHTS = [3.0, 1.0, 2.0, 0.5]  # what tokens 1..4 add to the target's logit
PROMPT = [1, 2, 3, 4]


class BagOfWords(nn.Module):
    """logits[b, i, c] = Σ_{j ≤ i} W[ids[b, j], c]: each token present adds its row of W to every
    later position (causal), so a score is a sum over the tokens that were not replaced."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w.double())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w[ids].cumsum(1)


def toy(**rows: list[float]) -> BagOfWords:
    """W with the given target-column values for tokens 1..4 (row 0, the replacement, adds nothing)."""
    w = torch.zeros(V, V)
    for column, values in {TARGET: WEIGHTS, **{int(k[1:]): v for k, v in rows.items()}}.items():
        w[1:5, column] = torch.tensor(values)
    return BagOfWords(w)


def p_of(z: float, others: int = V - 1) -> float:
    """Softmax probability of a logit z when every other logit is 0."""
    return math.exp(z) / (math.exp(z) + others)


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(z) / np.exp(z).sum()


def trapezoid(y: list[float]) -> float:
    """Area on [0, 1] of evenly spaced points."""
    h = 1 / (len(y) - 1)
    return sum((a + b) / 2 * h for a, b in itertools.pairwise(y))


# ----------------------------------------------------------------------------- hand-computed metrics
def test_every_metric_of_a_perfect_explanation_by_hand():
    """relevance = the true contributions: order token 1, 3, 2, 4 (weights 3, 2, 1, 0.5)."""
    r = faithfulness(toy(), [(PROMPT, WEIGHTS, TARGET)], score="logit", fractions=(0.25, 0.5))
    ex = r.examples[0]
    assert ex.curves["deletion"] == ([0.0, 0.25, 0.5, 0.75, 1.0], [6.5, 3.5, 1.5, 0.5, 0.0])
    assert ex.curves["insertion"][1] == [0.0, 3.0, 5.0, 6.0, 6.5]
    assert ex.full_score == 6.5 and ex.empty_score == 0.0
    expected = {"deletion": 0.25 * (5 + 2.5 + 1 + 0.25), "insertion": 0.25 * (1.5 + 4 + 5.5 + 6.25),
                "comprehensiveness": ((6.5 - 3.5) + (6.5 - 1.5)) / 2,  # top 1 and top 2 removed
                "sufficiency": ((6.5 - 3.0) + (6.5 - 5.0)) / 2}  # only top 1 / top 2 kept
    expected["abpc"] = expected["insertion"] - expected["deletion"]  # LeRF = insertion read backwards
    assert r.mean == pytest.approx(expected, abs=1e-12)
    assert list(r.mean) == list(METRICS)


def test_probability_score_and_a_reversed_explanation():
    """score="prob": p = e^z / (e^z + 7). A reversed ranking removes the weakest tokens first."""
    r = faithfulness(toy(), [(PROMPT, [-w for w in WEIGHTS], TARGET)], fractions=(0.25,))
    deletion = [p_of(z) for z in (6.5, 6.0, 5.0, 3.0, 0.0)]  # tokens 4, 2, 3, 1 removed in turn
    insertion = [p_of(z) for z in (0.0, 0.5, 1.5, 3.5, 6.5)]
    assert r.examples[0].curves["deletion"][1] == pytest.approx(deletion, abs=1e-12)
    assert r.mean["deletion"] == pytest.approx(trapezoid(deletion), abs=1e-12)
    assert r.mean["insertion"] == pytest.approx(trapezoid(insertion), abs=1e-12)
    assert r.mean["comprehensiveness"] == pytest.approx(p_of(6.5) - p_of(6.0), abs=1e-12)
    assert r.mean["sufficiency"] == pytest.approx(p_of(6.5) - p_of(0.5), abs=1e-12)
    assert r.mean["abpc"] < 0  # a wrong ranking scores below zero


def test_bins_round_up_and_keep_at_least_one_token():
    """Default fractions on 4 tokens: ⌈0.01·4⌉ = ⌈0.05·4⌉ = ⌈0.1·4⌉ = ⌈0.2·4⌉ = 1, ⌈0.5·4⌉ = 2."""
    r = faithfulness(toy(), [(PROMPT, WEIGHTS, TARGET)], metrics=["comprehensiveness"], score="logit")
    assert r.mean["comprehensiveness"] == pytest.approx((4 * 3.0 + 5.0) / 5)
    assert r.examples[0].curves == {}  # nothing asked for a curve


def test_the_replacement_token_is_the_one_asked_for():
    """Replacement 6 adds 0.25 to the target logit wherever it stands."""
    model = toy()
    model.w[OTHER, TARGET] = 0.25
    r = faithfulness(model, [(PROMPT, WEIGHTS, TARGET)], metrics=["deletion"], score="logit", replacement=OTHER)
    assert r.examples[0].curves["deletion"][1] == pytest.approx([6.5, 3.75, 2.0, 1.25, 1.0])
    assert r.replacement == OTHER
    assert faithfulness(model, [(PROMPT, WEIGHTS, TARGET)], score="logit").examples[0].empty_score == 0.0


def test_steps_measure_evenly_spaced_points():
    """10 tokens adding 1 each: the curves are straight lines, so any grid gives area 5."""
    w = torch.zeros(12, 12)
    w[1:11, 11] = 1.0
    r = faithfulness(BagOfWords(w), [(list(range(1, 11)), list(range(10, 0, -1)), 11)], score="logit", steps=4)
    x, y = r.examples[0].curves["deletion"]
    assert x == [0.0, 0.2, 0.5, 0.8, 1.0] and y == [10.0, 8.0, 5.0, 2.0, 0.0]
    assert r.mean["deletion"] == pytest.approx(5.0) and r.mean["insertion"] == pytest.approx(5.0)


def test_a_continuation_scores_its_tokens_given_the_perturbed_prompt():
    """Target [5, 6]: the prompt predicts 5, then prompt + 5 predicts 6 (token 5 adds 1 to column 6).
    Logit score: S5(kept) + S6(kept) + 1; order by relevance [4, 1, 2, 2.5]: tokens 1, 4, 3, 2."""
    model = toy(c6=[1.0, 0.0, 0.0, 2.0])
    model.w[TARGET, OTHER] = 1.0
    relevance = [4.0, 1.0, 2.0, 2.5]
    r = faithfulness(model, [(PROMPT, relevance, [TARGET, OTHER])], metrics=["deletion"], score="logit")
    assert r.examples[0].curves["deletion"][1] == pytest.approx([10.5, 6.5, 4.0, 2.0, 1.0])
    # "prob": the joint probability p(5 | x) · p(6 | x, 5), from the logit vectors written out
    z1 = np.zeros(V)
    z1[TARGET], z1[OTHER] = 6.5, 3.0
    z2 = z1.copy()
    z2[OTHER] += 1.0  # token 5 appended: its row adds to column 6 only
    joint = softmax(z1)[TARGET] * softmax(z2)[OTHER]
    full = faithfulness(model, [(PROMPT, relevance, [TARGET, OTHER])], metrics=["deletion"]).examples[0]
    assert full.full_score == pytest.approx(joint, rel=1e-12)


def test_a_contrast_scores_the_difference():
    model = toy(c6=[1.0, 0.0, 0.0, 2.0])
    relevance = [4.0, 1.0, 2.0, 2.5]
    r = faithfulness(model, [(PROMPT, relevance, (TARGET, OTHER))], metrics=["deletion"], score="logit")
    assert r.examples[0].curves["deletion"][1] == pytest.approx([3.5, 1.5, 3.0, 1.0, 0.0])
    z = np.zeros(V)
    z[TARGET], z[OTHER] = 6.5, 3.0
    p = softmax(z)
    prob = faithfulness(model, [(PROMPT, relevance, (TARGET, OTHER))], metrics=["deletion"])
    assert prob.examples[0].full_score == pytest.approx(p[TARGET] - p[OTHER], rel=1e-12)


def test_a_model_returning_an_output_object_as_transformers_does():
    class WithLogits(BagOfWords):
        def forward(self, ids):
            return types.SimpleNamespace(logits=super().forward(ids))

    class Flat(BagOfWords):
        def forward(self, ids):
            return super().forward(ids)[:, -1]

    r = faithfulness(WithLogits(toy().w), [(PROMPT, WEIGHTS, TARGET)], metrics=["deletion"], score="logit")
    assert r.examples[0].curves["deletion"][1] == [6.5, 3.5, 1.5, 0.5, 0.0]
    with pytest.raises(ExplainError, match=r"expected logits \(batch, tokens, vocab\)"):
        faithfulness(Flat(toy().w), [(PROMPT, WEIGHTS, TARGET)])


def test_keep_first_never_replaces_token_0():
    """Token 1 (weight 3) stays; the other three go in the order 3, 2, 4 (weights 2, 1, 0.5)."""
    r = faithfulness(toy(), [(PROMPT, WEIGHTS, TARGET)], metrics=["deletion", "insertion"], score="logit",
                     keep_first=True)
    ex = r.examples[0]
    assert ex.n_tokens == 3 and ex.curves["deletion"] == ([0.0, 1 / 3, 2 / 3, 1.0], [6.5, 4.5, 3.5, 3.0])
    assert ex.curves["insertion"][1] == [3.0, 5.0, 6.0, 6.5]
    with pytest.raises(ExplainError, match="keep_first"):
        faithfulness(toy(), [([1], [1.0], TARGET)], keep_first=True)


def test_ties_keep_prompt_order():
    r = faithfulness(toy(), [(PROMPT, [1.0, 1.0, 1.0, 1.0], TARGET)], metrics=["deletion"], score="logit")
    assert r.examples[0].curves["deletion"][1] == [6.5, 3.5, 2.5, 0.5, 0.0]  # tokens 1, 2, 3, 4


# ----------------------------------------------------------------------------- a real GPT
@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return lucidlm.GPT(lucidlm.Config.from_name("tiny-llama")).eval()


def by_hand_deletion(model, ids, relevance, target, replacement):
    """p(target) after replacing the k most relevant tokens, k = 0..n, one forward each."""
    order = sorted(range(len(ids)), key=lambda i: (-float(relevance[i]), i))
    curve = []
    for k in range(len(ids) + 1):
        x = [replacement if i in order[:k] else t for i, t in enumerate(ids)]
        with torch.no_grad():
            curve.append(float(model(torch.tensor([x]))[0, -1].double().softmax(-1)[target]))
    return curve


def test_batched_and_deduplicated_equals_one_prompt_at_a_time(gpt):
    prompts = [[1, 5, 7, 9, 11, 13], [2, 4], [3, 3, 3, 8, 8]]  # repeated ids: many equal perturbed prompts
    exps = [explain(gpt, None, p, target=3) for p in prompts]
    batched = faithfulness(gpt, exps, replacement=3)
    single = faithfulness(gpt, exps, replacement=3, batch_size=1)
    for a, b in zip(batched.examples, single.examples):
        assert a.metrics == pytest.approx(b.metrics, abs=1e-6)
    for e, ex in zip(exps, batched.examples):
        assert ex.curves["deletion"][1] == pytest.approx(
            by_hand_deletion(gpt, e.token_ids, e.relevance, 3, replacement=3), abs=1e-6)


def test_a_continuation_on_a_gpt_matches_a_full_forward(gpt):
    e = explain(gpt, None, [1, 5, 7, 9], target=[3, 4, 6])
    r = faithfulness(gpt, [e], metrics=["deletion"])
    with torch.no_grad():
        logp = gpt(torch.tensor([[1, 5, 7, 9, 3, 4]]))[0].double().log_softmax(-1)
    assert r.examples[0].full_score == pytest.approx(math.exp(logp[3, 3] + logp[4, 4] + logp[5, 6]), rel=1e-5)
    assert math.log(r.examples[0].full_score) == pytest.approx(e.target_logit, abs=1e-4)  # what was explained


def test_every_input_form_gives_the_same_result(gpt):
    e = explain(gpt, None, [1, 5, 7, 9, 11], target=3)
    row = {"id": "r0", "token_ids": e.token_ids, "relevance": e.relevance.tolist(), "target_ids": [3],
           "score_label": "logit", "method": "attnlrp"}
    forms = [e, row, (np.array(e.token_ids), e.relevance.numpy(), np.int64(3)), (torch.tensor(e.token_ids),
                                                                                 e.relevance, 3)]
    results = [faithfulness(gpt, [f]).to_dict()["examples"][0] for f in forms]
    for r in results[1:]:
        assert {k: v for k, v in r.items() if k != "id"} == {k: v for k, v in results[0].items() if k != "id"}
    assert [r["id"] for r in results] == [0, "r0", 0, 0]
    assert faithfulness(gpt, [e, row]).method == "attnlrp"


def test_an_llm_brings_its_default_replacement(gpt):
    class OneTokenSpace:
        def encode(self, text, add_special_tokens=True):
            return [7] if text == " " else [1, 2]

    llm = lucidlm.LLM(gpt, tokenizer=OneTokenSpace())
    assert faithfulness(llm, [([1, 5, 9], [1.0, 0.0, 2.0], 3)]).replacement == 7
    assert faithfulness(gpt, [([1, 5, 9], [1.0, 0.0, 2.0], 3)]).replacement == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"metrics": ["deletion", "auc"]}, "metrics"), ({"score": "logprob"}, "score"),
    ({"fractions": (0.0, 0.5)}, "fractions"), ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
    ({"replacement": 10_000}, "replacement"), ({"replacement": -1}, "replacement")])
def test_bad_options_are_named(gpt, kwargs, match):
    with pytest.raises(ExplainError, match=match):
        faithfulness(gpt, [([1, 5], [0.0, 1.0], 3)], **kwargs)


@pytest.mark.parametrize("explanations, match", [
    ([], "empty"), ([([1, 5], [0.0, float("nan")], 3)], "NaN"), ([([1, 5], [0.0], 3)], r"explanations\[0\]"),
    ([{"token_ids": [1], "relevance": [1.0]}], "target_ids"), ([([], [], 3)], "token_ids is empty"),
    ([([1, 5], [0.0, 1.0], (3, 4, 5))], "contrast"), ([([1.5, 2], [0.0, 1.0], 3)], "integer token ids"),
    ([{"token_ids": [1], "relevance": [1.0], "target_ids": [3, 4], "score_label": "logit"}], "token target"),
    ("abc", "list of explanations")])
def test_bad_explanations_are_named(gpt, explanations, match):
    with pytest.raises(ExplainError, match=match):
        faithfulness(gpt, explanations)


# ----------------------------------------------------------------------------- result, JSON, plot
def test_json_round_trip_and_a_valid_png(tmp_path):
    import matplotlib.image

    r = faithfulness(toy(), [(PROMPT, WEIGHTS, TARGET), (PROMPT[:2], [0.0, 1.0], TARGET)], score="logit")
    data = json.loads(r.save_json(tmp_path / "r.json").read_text())
    assert data["mean"] == r.mean and data["n_examples"] == 2
    assert FaithfulnessResult.from_dict(data).to_dict() == r.to_dict()
    assert r.stderr["deletion"] == pytest.approx(np.std(r.values("deletion"), ddof=1) / math.sqrt(2))
    # the mean curve: the 2-token prompt's curve [4, 3, 0] (token 2 first) interpolated onto the grid
    x, y = r.mean_curve("deletion", points=5)
    assert x == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert y == pytest.approx([(6.5 + 4) / 2, (3.5 + 3.5) / 2, (1.5 + 3) / 2, (0.5 + 1.5) / 2, 0.0])
    png = r.plot(tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob(".*tmp"))


def test_plot_needs_a_curve(tmp_path):
    r = faithfulness(toy(), [(PROMPT, WEIGHTS, TARGET)], metrics=["sufficiency"])
    with pytest.raises(ExplainError, match="deletion or insertion"):
        r.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_doctests():
    from lucidlm import evaluate
    from lucidlm.commands import faithfulness as command
    from lucidlm.evaluate import inputs, metrics, plot, result, runs

    for module in (evaluate, inputs, metrics, result, plot, runs, command):
        assert doctest.testmod(module).failed == 0, module.__name__


# ----------------------------------------------------------------------------- lucidlm faithfulness DIR
@pytest.fixture
def dataset_dir(tmp_path):
    """A hand-written explain-dataset directory (the format lucidlm.explain.dataset.read_results
    reads): two JSONL shards and a manifest; the model is a tiny saved one without a tokenizer
    (prompts are ids), named by --model since a manifest holds only the model's name."""
    from lucidlm.checkpoints import save_model

    llm = lucidlm.LLM.from_config("tiny-llama", seed=0)
    model_dir = save_model(llm.model, tmp_path / "model")  # not llm.save: it imports peft (seconds)
    out = tmp_path / "explained"
    out.mkdir()
    prompts = [[1, 5, 7, 9, 11], [2, 4, 6], [3, 8, 8, 13], [10, 12]]
    rows = []
    for i, ids in enumerate(prompts):
        e = llm.explain(ids, target=None if i != 3 else [3, 4])
        rows.append({"id": f"rec-{i}", "tokens": e.tokens, "token_ids": e.token_ids, "relevance": e.relevance.tolist(),
                     "target": e.target, "target_ids": e.target_ids, "logit": e.target_logit, "method": e.method,
                     "score_label": e.score_label})
    shards = []
    for s, shard in enumerate((rows[:2], rows[2:])):
        (out / f"shard-{s:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shard))
        shards.append({"file": f"shard-{s:05d}.jsonl", "rows": len(shard)})
    manifest = {"model": "model", "method": "attnlrp", "format": "jsonl", "records": 4, "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, rows, model_dir


def test_the_evaluate_command_on_a_directory(dataset_dir, tmp_path, capsys):
    from lucidlm.cli import main

    directory, rows, model_dir = dataset_dir
    out, png = tmp_path / "faith.json", tmp_path / "faith.png"
    assert main(["faithfulness", str(directory), "--model", str(model_dir), "--out", str(out), "--plot", str(png),
                 "--replacement", "2"]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith(f"faithfulness of 4 explanations (attnlrp) in {directory} on model")
    assert [line.split()[0] for line in stdout[2:]] == list(METRICS)
    data = json.loads(out.read_text())
    api = faithfulness(lucidlm.LLM.load(model_dir), rows, replacement=2)
    assert data["mean"] == pytest.approx(api.mean, abs=1e-9)
    assert [e["id"] for e in data["examples"]] == ["rec-0", "rec-1", "rec-2", "rec-3"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_evaluate_command_refuses_bad_arguments(dataset_dir, tmp_path, capsys):
    from lucidlm.cli import main

    directory, _, _ = dataset_dir
    assert main(["faithfulness", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["faithfulness", str(directory)]) == 2  # the manifest's "model" is a bare folder name
    assert "pass --model" in capsys.readouterr().err
    assert main(["faithfulness", str(directory), "--metrics", "deletion,auc"]) == 2
    assert "metrics" in capsys.readouterr().err
    assert main(["faithfulness", str(directory), "--out", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_model_a_manifest_names():
    from lucidlm.evaluate.runs import model_for

    assert model_for(None, {}) is None and model_for(None, {"model": "SmolLM2-135M-Instruct"}) is None
    assert model_for(None, {"model": "HuggingFaceTB/SmolLM2-360M"}) == "HuggingFaceTB/SmolLM2-360M"
    assert model_for("/x", {"model": "y"}) == "/x"
    with pytest.raises(ExplainError, match="pass --model"):
        model_for(None, {"model": "run-3"})


def test_evaluate_and_bench_help_import_no_torch():
    code = ("import sys\nfrom lucidlm.cli import main\nfor argv in (['faithfulness', '--help'], "
            "['bench', 'faithfulness', '--help']):\n    try:\n        main(argv)\n    except SystemExit:\n"
            "        pass\nassert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "--replacement ID" in done.stdout and "--n-prompts N" in done.stdout

"""Explanation diffs between a base and a tuned model (``lucidlm.explain.diff``), against oracles:
conservation (CP-LRP on bias-free models sums to the logits of plain forwards), the adapter split
against gradient × input with the LoRA branches detached, merged vs unmerged, a peft-made adapter
vs ours, a full fine-tune vs two separate explanations, and ablation faithfulness on the embedded
model with an adapter that teaches a made-up fact."""

import copy
import json
import shutil

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

import lucidlm  # noqa: E402
from lucidlm import GPT, LLM, Config, rules  # noqa: E402
from lucidlm.errors import ExplainError  # noqa: E402
from lucidlm.explain.components import component_values  # noqa: E402
from lucidlm.explain.diff import ExplanationDiff, explain_diff  # noqa: E402
from lucidlm.explain.explainer import explain  # noqa: E402
from lucidlm.train.lora import attach_lora, lora_layers, merge_lora  # noqa: E402

PROMPT = [1, 17, 42, 5, 63, 8, 29, 77, 11]
# float64 models, float32 relevances: sums hold to ~1e-7 relative; 1e-4 leaves room and still
# fails on any real leak (a bias, a missing rule, a target mismatch moves the sum by percents)
REL = 1e-4


def tiny(seed: int = 0, dtype=torch.float64, **changes) -> GPT:
    """A bias-free tiny Llama (no bias anywhere: CP-LRP conserves exactly)."""
    torch.manual_seed(seed)
    model = GPT(Config.from_name("tiny-llama", **changes)).to(dtype).eval()
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    return model


def randomise_b(model, seed: int = 0, scale: float = 0.3) -> None:
    """peft starts LoRA with B = 0 (a no-op); random B makes every adapter branch matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=g, dtype=b.weight.dtype) * scale)


def with_lora(base: GPT, seed: int = 0, random_b: bool = True) -> GPT:
    tuned = copy.deepcopy(base)
    torch.manual_seed(seed)
    attach_lora(tuned, r=4, alpha=8)
    tuned.to(next(base.parameters()).dtype).eval()
    if random_b:
        randomise_b(tuned, seed)
    return tuned


@pytest.fixture(scope="module")
def pair():
    """(base, tuned with a random-B LoRA adapter), float64."""
    base = tiny()
    return base, with_lora(base)


def plain_logits(model, ids) -> torch.Tensor:
    """Every position's logits from a plain forward (no rules): the oracle for the scores."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double()


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def gradient_x_input(model, ids, score, method: str, detach_branches: bool = False) -> torch.Tensor:
    """Relevance of every input position, computed here without explain_diff: gradient × input at
    the embeddings of ``score(logits)`` (logits of every position) under ``method``'s rules.
    ``detach_branches``: every LoRA branch's output detached in the forward, so only what reaches
    the tokens through the base weights is left."""
    def detach(_module, _args, output):
        return output.detach()

    branches = [b for layer in lora_layers(model).values() for b in layer.lora_B.values()] if detach_branches else []
    handles = [b.register_forward_hook(detach) for b in branches]
    try:
        pos = torch.arange(len(ids))[None]
        h0 = model.embed_tokens(torch.tensor([ids]), pos).detach().requires_grad_()
        with torch.enable_grad(), rules.explaining(method):
            value = score(model(inputs_embeds=h0, positions=pos)[0])
        (grad,) = torch.autograd.grad(value, h0)
    finally:
        for handle in handles:
            handle.remove()
    return (h0 * grad).sum(-1)[0].detach()


def scorer(target):
    """The explained score (objective "logit") as a function of every position's logits."""
    if isinstance(target, tuple):
        return lambda logits: logits[-1, target[0]] - logits[-1, target[1]]
    if isinstance(target, list):  # the continuation: scored from the last prompt token on
        return lambda logits: sum(logits[len(PROMPT) - 1 + i, t] for i, t in enumerate(target))
    return lambda logits: logits[-1, target]


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("target, objective", [(7, "logprob"), ((7, 40), "logprob"), ([7, 40, 3], "logit")],
                         ids=["token", "contrast", "continuation"])
def test_cp_lrp_differences_sum_to_the_logit_delta(pair, target, objective):
    base, tuned = pair
    d = explain_diff(tuned, None, base, None, PROMPT, target=target, objective=objective)
    inputs = PROMPT + (target[:-1] if isinstance(target, list) else [])
    score = scorer(target)
    for model, e in [(tuned, d.tuned), (base, d.base)]:
        assert rel_err(e.target_logit, float(score(plain_logits(model, inputs)))) < 1e-6
    assert abs(d.logit_delta) > 1e-2  # the adapter changed the score: the sums below say something
    # a continuation's own input tokens (all but its last) take part of the relevance; explanations
    # return the prompt's part, so their share comes from the independent computation
    rest = {}
    for name, model, e in [("tuned", tuned, d.tuned), ("base", base, d.base)]:
        full = gradient_x_input(model, inputs, score, "cp-lrp")
        torch.testing.assert_close(e.relevance, full[:len(PROMPT)].float(), rtol=1e-5, atol=1e-6)
        rest[name] = full[len(PROMPT):].sum().item()
        assert rel_err(e.relevance.double().sum().item() + rest[name], e.target_logit) < REL
    assert rel_err(d.relevance.double().sum().item() + rest["tuned"] - rest["base"], d.logit_delta) < REL
    if not isinstance(target, list):
        assert rest == {"tuned": 0.0, "base": 0.0}
    assert d.relevance.shape == (len(PROMPT),) and d.tokens == [str(i) for i in PROMPT]


# ----------------------------------------------------------------------------- the adapter split
def test_an_adapter_at_its_initial_state_changes_nothing():
    base = tiny()
    tuned = with_lora(base, random_b=False)  # peft's B = 0: the adapter is a no-op
    branches = [b for layer in lora_layers(tuned).values() for b in layer.lora_B.values()]
    assert branches and all(torch.count_nonzero(b.weight) == 0 for b in branches)
    d = explain_diff(tuned, None, base, None, PROMPT, target=(7, 40))
    assert d.adapter_relevance is not None  # the branches ran, and carried nothing
    assert d.logit_delta == 0.0
    assert torch.count_nonzero(d.relevance) == 0
    assert torch.count_nonzero(d.adapter_relevance) == 0
    assert all(change == 0.0 for kind in ("layers", "heads", "neurons") for _, change in d.components(kind))


@pytest.mark.parametrize("method", ["cp-lrp", "attnlrp"])
def test_the_base_weights_part_is_gradient_times_input_with_the_branches_detached(pair, method):
    base, tuned = pair
    d = explain_diff(tuned, None, base, None, PROMPT, target=7, method=method)
    expected = gradient_x_input(tuned, PROMPT, scorer(7), method, detach_branches=True).float()
    torch.testing.assert_close(d.base_relevance_of_tuned, expected, rtol=1e-5, atol=1e-6)
    # the adapter's part matters here, and the two parts add up to the tuned relevance
    assert d.adapter_relevance.abs().max() > 1e-2 * d.tuned.relevance.abs().max()
    torch.testing.assert_close(d.base_relevance_of_tuned + d.adapter_relevance, d.tuned.relevance)
    # and the tuned relevance is the one explain() gives the tuned model alone
    alone = explain(tuned, None, PROMPT, target=7, method=method)
    torch.testing.assert_close(d.tuned.relevance, alone.relevance, rtol=1e-5, atol=1e-6)


def test_merged_and_unmerged_give_the_same_tuned_relevance(pair):
    base, tuned = pair
    unmerged = LLM(copy.deepcopy(tuned)).explain_diff(LLM(base), PROMPT, target=(7, 40))
    merged_llm = LLM(copy.deepcopy(tuned)).merge_adapter()
    assert not lora_layers(merged_llm.model)
    merged = merged_llm.explain_diff(LLM(base), PROMPT, target=(7, 40))
    assert unmerged.adapter_relevance is not None and merged.adapter_relevance is None
    torch.testing.assert_close(merged.tuned.relevance, unmerged.tuned.relevance, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(merged.relevance, unmerged.relevance, rtol=1e-6, atol=1e-8)
    assert merged.logit_delta == pytest.approx(unmerged.logit_delta, rel=1e-9)
    # merge_lora directly, on the bare model, too
    d = explain_diff(merge_lora(copy.deepcopy(tuned)), None, base, None, PROMPT, target=(7, 40))
    torch.testing.assert_close(d.tuned.relevance, unmerged.tuned.relevance, rtol=1e-6, atol=1e-8)


def test_a_full_fine_tune_is_two_separate_explanations():
    base, tuned = LLM(tiny(seed=0, dtype=torch.float32)), LLM(tiny(seed=1, dtype=torch.float32))
    d = tuned.explain_diff(base, PROMPT)  # target None: the tuned model's top token
    top = int(plain_logits(tuned.model, PROMPT)[-1].argmax())
    assert d.adapter_relevance is None and d.base_relevance_of_tuned is None
    assert d.tuned.target_ids == d.base.target_ids == [top]
    t = tuned.explain(PROMPT, target=top, method="cp-lrp", layers="all")
    b = base.explain(PROMPT, target=top, method="cp-lrp", layers="all")
    torch.testing.assert_close(d.relevance, t.relevance - b.relevance)
    assert d.logit_delta == pytest.approx(t.target_logit - b.target_logit)
    changes = d.component_changes("neurons")
    tn, bn = component_values(t.layers, "neurons"), component_values(b.layers, "neurons")
    assert changes.keys() == tn.keys() and len(changes) == 2 * 128
    assert all(changes[k] == pytest.approx(tn[k] - bn[k], abs=1e-6) for k in changes)


# ----------------------------------------------------------------------------- peft vs ours
def hf_name(ours: str) -> str:
    """Our Llama module name -> transformers' (written out here, not taken from the loader)."""
    return "model." + ours.replace(".attn.", ".self_attn.")


def test_a_peft_made_adapter_and_ours_give_the_same_diff(hf_checkpoint, tmp_path):
    from families import build_hf_model

    _, directory = hf_checkpoint("llama2")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(3)
    theirs_hf = peft.get_peft_model(build_hf_model("llama2"), config).eval()
    theirs_hf.save_pretrained(tmp_path / "peft")
    base = LLM.load(directory)
    theirs = LLM.load(directory, adapter=tmp_path / "peft")
    ours = LLM.load(directory)
    attach_lora(ours.model, r=4, alpha=8)
    state = theirs_hf.state_dict()
    with torch.no_grad():
        for name, layer in lora_layers(ours.model).items():
            prefix = f"base_model.model.{hf_name(name)}"
            layer.lora_A["default"].weight.copy_(state[f"{prefix}.lora_A.default.weight"])
            layer.lora_B["default"].weight.copy_(state[f"{prefix}.lora_B.default.weight"])
    ours.model.eval()
    d_theirs = theirs.explain_diff(base, PROMPT, target=(7, 40))
    d_ours = ours.explain_diff(base, PROMPT, target=(7, 40))
    # the explained score is peft's own (transformers + peft forward)
    with torch.no_grad():
        last = theirs_hf(torch.tensor([PROMPT])).logits[0, -1]
    assert d_ours.tuned.target_logit == pytest.approx((last[7] - last[40]).item(), rel=1e-4, abs=1e-5)
    assert abs(d_ours.logit_delta) > 1e-2
    for got, want in [(d_theirs.relevance, d_ours.relevance), (d_theirs.tuned.relevance, d_ours.tuned.relevance),
                      (d_theirs.adapter_relevance, d_ours.adapter_relevance)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert d_ours.adapter_relevance.abs().max() > 0
    theirs_heads, ours_heads = d_theirs.component_changes("heads"), d_ours.component_changes("heads")
    assert theirs_heads.keys() == ours_heads.keys()
    assert all(theirs_heads[k] == pytest.approx(ours_heads[k], rel=1e-4, abs=1e-6) for k in ours_heads)


# ----------------------------------------------------------------------------- text, chat, contrast
@pytest.fixture(scope="module")
def tiny_pair(tiny_lm_dir):
    """(base, tuned) LLMs on the tiny Llama with the embedded model's tokenizer, float64."""
    base = LLM.load(tiny_lm_dir, dtype=torch.float64)
    tuned = LLM.load(tiny_lm_dir, dtype=torch.float64)
    torch.manual_seed(0)
    attach_lora(tuned.model, r=4, alpha=8)
    tuned.model.double().eval()
    randomise_b(tuned.model, scale=1.0)
    return base, tuned


def test_chat_prompts_and_contrast_targets(tiny_pair):
    base, tuned = tiny_pair
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    d = tuned.explain_diff(base, messages, target=(" Paris", " London"))
    ids = tuned.tokenizer.encode_chat(messages)
    paris, london = (tuned.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Paris", " London"))
    assert d.tuned.token_ids == d.base.token_ids == ids
    assert d.tuned.target_ids == d.base.target_ids == [paris, london]
    for model, e in [(tuned.model, d.tuned), (base.model, d.base)]:
        last = plain_logits(model, ids)[-1]
        assert e.target_logit == pytest.approx((last[paris] - last[london]).item(), rel=1e-6)
    assert abs(d.logit_delta) > 1e-3
    assert rel_err(d.relevance.double().sum().item(), d.logit_delta) < REL
    assert d.adapter_relevance is not None and d.adapter_relevance.shape == (len(ids),)
    # a text prompt with the tuned top token, and its wire form
    text = tuned.explain_diff(base, "The capital of France is")
    top = int(plain_logits(tuned.model, tuned.tokenizer.encode("The capital of France is"))[-1].argmax())
    assert text.tuned.target_ids == text.base.target_ids == [top]
    back = ExplanationDiff.from_dict(json.loads(json.dumps(text.to_dict())))
    assert back == text and back.logit_delta == pytest.approx(text.logit_delta)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("field, value", [("n_layer", 3), ("n_embd", 32), ("vocab_size", 300)])
def test_a_base_of_another_architecture_is_refused_naming_the_field(pair, field, value):
    base = tiny(**{field: value})
    with pytest.raises(ExplainError, match=rf"{field} {value} vs"):
        explain_diff(pair[1], None, base, None, PROMPT)


def test_a_base_with_another_vocabulary_is_refused(tiny_lm_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_lm_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "ĠParis", "ĠLondon"  # the same size, two tokens swapped: the same ids mean other words
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    tuned, base = LLM.load(tiny_lm_dir), LLM.load(other)
    assert tuned.tokenizer.vocab_size == base.tokenizer.vocab_size
    with pytest.raises(ExplainError, match="different vocabularies"):
        tuned.explain_diff(base, "The capital of France is")
    with pytest.raises(ExplainError, match="both have a tokenizer"):
        tuned.explain_diff(LLM(base.model), "The capital of France is")


def test_bad_targets_components_and_kinds_are_refused(pair):
    base, tuned = pair
    with pytest.raises(ExplainError, match="token id 100000 is out of range"):
        explain_diff(tuned, None, base, None, PROMPT, target=100000)
    with pytest.raises(ExplainError, match="expected an LLM"):
        LLM(tuned).explain_diff(base, PROMPT)
    d = explain_diff(tuned, None, base, None, PROMPT, target=7)
    for name, message in [("layers.2", "layers 0 to 1"), ("layers.0.attn.head.4", "heads 0 to 3"),
                          ("layers.1.mlp.neuron.128", "neurons 0 to 127"), ("layers.0.mlp.expert.0.neuron.1", "named"),
                          ("attn.head.1", "expected a name"), ("layers.-1", "expected a name")]:
        with pytest.raises(ExplainError, match=rf"component '{name}'.*{message}"):
            d.ablate([name])
    with pytest.raises(ExplainError, match="kind='bogus'"):
        d.components(kind="bogus")
    with pytest.raises(ExplainError, match="top=-1"):
        d.components("heads", top=-1)
    back = ExplanationDiff.from_dict(json.loads(json.dumps(d.to_dict())))
    with pytest.raises(ExplainError, match="ablate needs the tuned model"):
        back.ablate(["layers.0"])
    nothing = explain_diff(tuned, None, base, None, PROMPT, target=7, layers=None)
    with pytest.raises(ExplainError, match="no latent relevances"):
        nothing.components("heads")


def test_ablation_zeroes_exactly_the_named_components(pair):
    """ablate() agrees with a forward where the weights that read the component are zeroed."""
    base, tuned = pair
    d = explain_diff(tuned, None, base, None, PROMPT, target=7)
    assert d.ablate([]) == pytest.approx(d.tuned.target_logit, rel=1e-9)
    edited = copy.deepcopy(base)
    with torch.no_grad():
        edited.layers[1].mlp.down_proj.weight[:, 5] = 0  # neuron 5 of layer 1 reaches nothing
        size = edited.layers[0].attn.o_proj.in_features // 4
        edited.layers[0].attn.o_proj.weight[:, 2 * size:3 * size] = 0  # head 2 of layer 0
    b = explain_diff(base, None, base, None, PROMPT, target=7)
    assert b.ablate(["layers.1.mlp.neuron.5", "layers.0.attn.head.2"]) == pytest.approx(
        plain_logits(edited, PROMPT)[-1, 7].item(), rel=1e-9)
    assert b.ablate(["layers.1.mlp.neuron.5"]) != pytest.approx(b.base.target_logit, rel=1e-6)


# ----------------------------------------------------------------------------- faithfulness
def study():
    """scripts/diff_study.py: the made-up fact's records and training recipe, and the ablation
    shares (one copy, which the study's README numbers come from too)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "scripts" / "diff_study.py"
    spec = importlib.util.spec_from_file_location("diff_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fact_adapter(smollm2):
    """The embedded model with a LoRA adapter that teaches a made-up fact (8 steps: 5 to 40 s on 2
    shared cores), the fact's first token (the base model ranks it about 550th), and the study."""
    fact_study = study()
    tuned = lucidlm.LLM.load()
    fact = fact_study.teach_fact(tuned)
    return tuned, fact, fact_study


def test_zeroing_the_top_changed_components_removes_more_of_the_gain_than_random(fact_adapter, smollm2):
    tuned, fact, fact_study = fact_adapter
    shares = {"heads": [], "neurons": []}
    for question in (fact_study.QUESTIONS[0], fact_study.QUESTIONS[3]):
        d = tuned.explain_diff(smollm2, fact_study.question(question), target=fact)
        assert d.logit_delta > 5, d  # the adapter taught the fact
        # 13 of 270 heads (5%), 46 of 46080 neurons (0.1%); the mean of 6 seeded random draws
        for kind, k in [("heads", 13), ("neurons", 46)]:
            top, random_draws = fact_study.removed_shares(d, kind, k, draws=6)
            shares[kind].append((top, sum(random_draws) / len(random_draws)))
    # measured: heads 0.2-0.45 vs random <= 0.08; neurons 0.8-1.3 vs random within ±0.02
    for kind, margin in [("heads", 0.1), ("neurons", 0.3)]:
        top = sum(s[0] for s in shares[kind]) / len(shares[kind])
        rnd = sum(s[1] for s in shares[kind]) / len(shares[kind])
        assert top > rnd + margin, (kind, shares[kind])


def test_mixture_of_experts_components_are_ranked_and_ablated_by_expert(hf_checkpoint):
    _, directory = hf_checkpoint("mixtral")
    base = LLM.load(directory, dtype=torch.float64)
    tuned = LLM.load(directory, dtype=torch.float64)
    torch.manual_seed(0)
    attach_lora(tuned.model, r=4, alpha=8)  # on MoE: the attention projections only
    tuned.model.double().eval()
    randomise_b(tuned.model)
    d = tuned.explain_diff(base, PROMPT, target=7)
    names = [name for name, _ in d.components("neurons")]
    n_expert, size = 4, tuned.model.layers[0].mlp.experts[0].down_proj.in_features
    assert len(names) == 3 * n_expert * size and all(".mlp.expert." in name for name in names)
    assert rel_err(d.relevance.double().sum().item(), d.logit_delta) < REL  # no biases in Mixtral
    top = names[0]
    assert d.ablate([top]) != pytest.approx(d.tuned.target_logit, rel=1e-9)  # the top neuron was routed to
    with pytest.raises(ExplainError, match="named layers.I.mlp.expert.E.neuron.J"):
        d.ablate(["layers.0.mlp.neuron.1"])
    with pytest.raises(ExplainError, match="experts 0 to 3"):
        d.ablate(["layers.0.mlp.expert.4.neuron.1"])


# ----------------------------------------------------------------------------- bench explain's diff rows
def test_bench_explain_diff_rows_run_the_adapter_split(tiny_lm_dir):
    from lucidlm.bench import explain as bench_explain
    from lucidlm.bench.args import diff_list

    llm = LLM.load(tiny_lm_dir)
    ids = bench_explain.prompt_ids(llm.tokenizer, 12, llm.config.vocab_size)
    lora = bench_explain._step(llm, "diff lora")(ids)
    full = bench_explain._step(llm, "diff full")(ids)
    assert lora.adapter_relevance is not None and lora.adapter_relevance.abs().max() > 0  # B is not 0
    assert lora.tuned.method == "cp-lrp" and lora.tuned.layers is not None  # as LLM.explain_diff runs it
    assert full.adapter_relevance is None and full.logit_delta == 0.0  # a copy: nothing changed
    assert not lora_layers(llm.model)  # the model itself is left alone
    assert diff_list("lora") == ["lora"] and diff_list("none") == []
    with pytest.raises(ExplainError, match="--diffs: 'merged'"):
        diff_list("lora,merged")

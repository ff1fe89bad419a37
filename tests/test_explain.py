"""Explanations on tiny random models of every family: conservation, bias accounting, dtypes, targets,
latent relevances, generation, and that the rules are active only while explaining."""

import math

import pytest
import torch

import lucidlm
from conftest import ALL_FAMILIES
from lucidlm.errors import ExplainError
from lucidlm import rules
from lucidlm.explain.explainer import explain, explain_generation

PROMPT = [1, 17, 42, 5, 63, 8, 29, 77, 11]
# The model is run in float64 for the exact checks, but RMSNorm and the explicit softmax compute in
# float32 whatever the model dtype, so "exact" below means to ~1e-7 relative, not 1e-15.
EXACT = 1e-6


def load(hf_checkpoint, family: str, dtype=torch.float32):
    _, directory = hf_checkpoint(family)
    return lucidlm.LLM.load(directory, dtype=dtype).model.eval()


def plain_logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].double()


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# --------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("family", ["llama3", "qwen3", "smollm2", "mixtral", "cohere2", "exaone4", "olmo3"])
def test_cp_lrp_conserves_the_logit_without_biases(family, hf_checkpoint):
    """CP-LRP makes a bias-free model locally linear: relevances sum to the logit exactly."""
    model = load(hf_checkpoint, family).double()
    e = explain(model, None, PROMPT, method="cp-lrp")
    logit = plain_logits(model)[e.target_ids[0]].item()
    assert e.target_ids == [int(plain_logits(model).argmax())]
    # the rules leave the forward exact (up to the float32 softmax of the explicit attention kernel)
    assert rel_err(e.target_logit, logit) < EXACT
    # relevance is returned in float32: its sum is good to ~1e-7 relative
    assert rel_err(e.relevance.double().sum().item(), e.target_logit) < 1e-4


def bias_relevance(model, ids, target: int, method: str) -> tuple[float, float, float]:
    """(Σ token relevance, Σ over biases of b · ∂logit/∂b, logit), from the same forward."""
    pos = torch.arange(len(ids))[None]
    h0 = model.embed_tokens(torch.tensor([ids]), pos).detach().requires_grad_()
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    with rules.explaining(method):
        logit = model(inputs_embeds=h0, last_only=True)[0, -1, target]
    grads = torch.autograd.grad(logit, [h0, *biases], allow_unused=True)
    absorbed = sum((b * g).sum().item() for b, g in zip(biases, grads[1:]) if g is not None)
    return (h0 * grads[0]).sum().item(), absorbed, logit.item()


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "phi2"])
def test_cp_lrp_with_biases_loses_exactly_what_the_biases_absorb(family, hf_checkpoint):
    """A bias b in y = Wx + b takes Σ b · ∂logit/∂y of the relevance (gradient × input of a bias
    treated as an input); the token relevances plus that equal the logit."""
    model = load(hf_checkpoint, family).double()
    e = explain(model, None, PROMPT, method="cp-lrp")
    tokens, absorbed, logit = bias_relevance(model, PROMPT, e.target_ids[0], "cp-lrp")
    assert rel_err(e.relevance.double().sum().item(), tokens) < 1e-5
    assert abs(absorbed) > 1e-3 * abs(logit)  # the biases matter: the check below means something
    assert rel_err(tokens, logit) > 1e-3
    assert rel_err(tokens + absorbed, logit) < EXACT


# --------------------------------------------------------------------------- every family
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_explains(family, method, hf_checkpoint):
    model = load(hf_checkpoint, family)
    e = explain(model, None, PROMPT, method=method)
    assert e.relevance.dtype == torch.float32 and e.relevance.shape == (len(PROMPT),)
    assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
    assert e.tokens == [str(i) for i in PROMPT] and e.token_ids == PROMPT and e.method == method
    assert math.isclose(e.target_logit, plain_logits(model)[e.target_ids[0]].item(), rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama3", "gemma2", "gpt2", "qwen3", "mixtral"])
def test_half_precision_gives_finite_relevance(family, dtype, hf_checkpoint):
    model = load(hf_checkpoint, family, dtype=dtype)
    for method in rules.METHODS:
        e = explain(model, None, PROMPT, method=method, layers="all")
        assert e.relevance.dtype == torch.float32 and torch.isfinite(e.relevance).all(), method
        assert all(torch.isfinite(v).all() for v in e.layers.values())


def test_half_precision_agrees_with_float32(hf_checkpoint):
    ref = explain(load(hf_checkpoint, "llama3"), None, PROMPT, target=5).relevance
    got = explain(load(hf_checkpoint, "llama3", torch.bfloat16), None, PROMPT, target=5).relevance
    assert torch.corrcoef(torch.stack([ref, got]))[0, 1] > 0.95


# --------------------------------------------------------------------------- rules are real
def test_attnlrp_differs_from_inputxgrad_and_cp_lrp(hf_checkpoint):
    model = load(hf_checkpoint, "llama3")
    r = {m: explain(model, None, PROMPT, target=5, method=m).relevance for m in rules.METHODS}
    assert not torch.allclose(r["attnlrp"], r["inputxgrad"], rtol=1e-2, atol=1e-4)
    assert not torch.allclose(r["attnlrp"], r["cp-lrp"], rtol=1e-2, atol=1e-4)


def test_inputxgrad_is_the_plain_gradient(hf_checkpoint):
    model = load(hf_checkpoint, "gemma2")  # soft-capping: an identity rule that must be off
    pos = torch.arange(len(PROMPT))[None]
    h0 = model.embed_tokens(torch.tensor([PROMPT]), pos).detach().requires_grad_()
    (g,) = torch.autograd.grad(model(inputs_embeds=h0, last_only=True)[0, -1, 5], h0)
    expected = (h0 * g).sum(-1)[0].detach()
    torch.testing.assert_close(explain(model, None, PROMPT, target=5, method="inputxgrad").relevance, expected)


def test_inference_is_untouched(hf_checkpoint):
    """Explaining leaves no trace: no hooks, no mode, no grads, bit-identical logits after."""
    model = load(hf_checkpoint, "gpt2")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        before = model(ids)
    explain(model, None, PROMPT, method="cp-lrp", layers="all")
    explain_generation(model, None, PROMPT, max_new_tokens=2)
    assert rules.current() is None
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before, after)


def test_explain_inside_no_grad(hf_checkpoint):
    model = load(hf_checkpoint, "llama3")
    with torch.no_grad():
        e = explain(model, None, PROMPT)
    torch.testing.assert_close(e.relevance, explain(model, None, PROMPT).relevance)


# --------------------------------------------------------------------------- targets
def test_target_id_and_top_token(hf_checkpoint):
    model = load(hf_checkpoint, "llama3")
    logits = plain_logits(model)
    top = explain(model, None, PROMPT)
    assert top.target_ids == [int(logits.argmax())] and top.target == str(int(logits.argmax()))
    low = int(logits.argmin())
    e = explain(model, None, PROMPT, target=low)
    assert e.target_ids == [low] and math.isclose(e.target_logit, logits[low].item(), rel_tol=1e-5, abs_tol=1e-5)


def test_contrast_is_the_difference_of_the_two_explanations(hf_checkpoint):
    """cp-lrp is linear in the explained score: R(a − b) = R(a) − R(b), and the sum is the logit
    difference (bias-free model)."""
    model = load(hf_checkpoint, "llama3").double()
    a, b = 5, 9
    logits = plain_logits(model)
    e = explain(model, None, PROMPT, target=(a, b), method="cp-lrp")
    assert e.target_ids == [a, b] and e.target == "5 vs 9"
    diff = (logits[a] - logits[b]).item()
    assert rel_err(e.target_logit, diff) < EXACT
    assert rel_err(e.relevance.double().sum().item(), e.target_logit) < 1e-4
    ra = explain(model, None, PROMPT, target=a, method="cp-lrp").relevance
    rb = explain(model, None, PROMPT, target=b, method="cp-lrp").relevance
    torch.testing.assert_close(e.relevance, ra - rb, atol=1e-5, rtol=1e-4)


def test_continuation_is_the_sum_of_log_probabilities(hf_checkpoint):
    model = load(hf_checkpoint, "llama3").double()
    cont = [33, 44, 55]
    with torch.no_grad():
        logp = model(torch.tensor([PROMPT + cont[:-1]]))[0].log_softmax(-1)
    n = len(PROMPT)
    expected = sum(logp[n - 1 + i, t].item() for i, t in enumerate(cont))
    e = explain(model, None, PROMPT, target=cont, method="cp-lrp")
    assert e.target_ids == cont and e.relevance.shape == (n,)
    assert rel_err(e.target_logit, expected) < EXACT
    assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
    logit_sum = explain(model, None, PROMPT, target=cont, objective="logit").target_logit
    with torch.no_grad():
        z = model(torch.tensor([PROMPT + cont[:-1]]))[0]
    assert rel_err(logit_sum, sum(z[n - 1 + i, t].item() for i, t in enumerate(cont))) < EXACT
    # a one-token continuation: its log-probability, relevance over the prompt only
    one = explain(model, None, PROMPT, target=[7])
    assert rel_err(one.target_logit, plain_logits(model).log_softmax(-1)[7].item()) < EXACT


class CharTokenizer:
    """One token per character ('a' = 3 ...): enough to test string targets."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join("<s>" if i == 1 else chr(ord("a") + i - 3) for i in ids)


def test_string_targets_and_prompt(hf_checkpoint):
    model = load(hf_checkpoint, "llama3")
    tok = CharTokenizer()
    e = explain(model, tok, "hello", target="x")
    assert e.tokens == ["<s>", "h", "e", "l", "l", "o"] and e.prompt == "hello"
    assert e.target_ids == [tok.encode("x", False)[0]] and e.target == "x"
    multi = explain(model, tok, "hello", target="xyz")  # several tokens: a continuation
    assert multi.target_ids == tok.encode("xyz", False) and multi.target == "xyz"
    assert explain(model, tok, "hello", target=("x", "y")).target == "x vs y"


@pytest.mark.parametrize("bad", [("x",), (1, 2, 3), [], 10_000, -1, 1.5, ("x", "yz")])
def test_bad_targets_raise(bad, hf_checkpoint):
    model = load(hf_checkpoint, "llama3")
    with pytest.raises(ExplainError):
        explain(model, CharTokenizer(), PROMPT, target=bad)


def test_bad_arguments_raise(hf_checkpoint):
    model = load(hf_checkpoint, "llama3")
    with pytest.raises(ExplainError, match="attnlrp, cp-lrp, inputxgrad"):
        explain(model, None, PROMPT, method="gradcam")
    with pytest.raises(ExplainError, match="tokenizer"):
        explain(model, None, "text without a tokenizer")
    with pytest.raises(ExplainError):
        explain(model, None, [])
    with pytest.raises(ExplainError):
        explain(model, None, PROMPT, layers=[7])
    with pytest.raises(ExplainError):
        explain_generation(model, None, PROMPT, method="lrp")
    with pytest.raises(ExplainError, match="layer index"):  # checked under a KV policy too
        explain(model, None, PROMPT, kv_cache="h2o", cache_tokens=4, layers=[7])


def test_kv_cache_delegates_to_the_cached_explainer(hf_checkpoint):
    from lucidlm.explain.cached import explain_cached

    model = load(hf_checkpoint, "llama3")
    e = explain(model, None, PROMPT, target=5, kv_cache="window", cache_tokens=4)
    assert e == explain_cached(model, None, PROMPT, target=5, kv_cache="window", cache_tokens=4)
    assert e.evicted.any()


# --------------------------------------------------------------------------- latent relevances
def block_relevances(model, ids, target: int):
    """Relevance at each block's input, and at each attention/MLP branch input (through that
    branch only), measured with the test's own hooks under cp-lrp."""
    seen = {}

    def keep(name):
        def hook(_module, args):
            seen[name] = args[0]
        return hook

    handles = []
    for i, block in enumerate(model.layers):
        handles += [block.register_forward_pre_hook(keep(f"block{i}")),
                    block.attn.register_forward_pre_hook(keep(f"attn{i}")),
                    block.mlp.register_forward_pre_hook(keep(f"mlp{i}"))]
    pos = torch.arange(len(ids))[None]
    h0 = model.embed_tokens(torch.tensor([ids]), pos).detach().requires_grad_()
    try:
        with rules.explaining("cp-lrp"):
            logit = model(inputs_embeds=h0, last_only=True)[0, -1, target]
    finally:
        for h in handles:
            h.remove()
    names = list(seen)
    grads = torch.autograd.grad(logit, [seen[n] for n in names], allow_unused=True)
    return {n: (seen[n] * g).sum().item() for n, g in zip(names, grads)}, logit.item()


@pytest.mark.parametrize("family", ["llama3", "qwen3", "mixtral"])
def test_latent_relevances_conserve_per_branch(family, hf_checkpoint):
    """Bias-free, cp-lrp: each block's input holds the whole logit, and the neurons of a layer's
    MLP (the heads of its attention) hold exactly the relevance that branch passes to its input."""
    model = load(hf_checkpoint, family).double()
    e = explain(model, None, PROMPT, method="cp-lrp", layers="all")
    c = model.config
    inner, logit = block_relevances(model, PROMPT, e.target_ids[0])
    for i in range(c.n_layer):
        mlp, attn = e.layers[f"layers.{i}.mlp"], e.layers[f"layers.{i}.attn"]
        assert attn.shape == (c.n_head,)
        assert mlp.shape == ((c.n_expert, c.intermediate_size) if c.n_expert else (c.intermediate_size,))
        assert rel_err(inner[f"block{i}"], logit) < EXACT
        assert rel_err(mlp.sum().item(), inner[f"mlp{i}"]) < 1e-4
        assert rel_err(attn.sum().item(), inner[f"attn{i}"]) < 1e-4
        assert abs(inner[f"mlp{i}"]) > 0 and abs(inner[f"attn{i}"]) > 0


def test_latent_layers_selection(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    assert explain(model, None, PROMPT).layers is None
    e = explain(model, None, PROMPT, layers=[-1])
    assert sorted(e.layers) == ["layers.2.attn", "layers.2.mlp"]
    assert e.layers["layers.2.mlp"].shape == (model.config.intermediate_size,)
    # hooks do not change the token relevances
    torch.testing.assert_close(e.relevance, explain(model, None, PROMPT).relevance)


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("family", ["llama3", "gemma2", "gpt2"])
def test_explain_generation(family, hf_checkpoint):
    model = load(hf_checkpoint, family)
    n, k = len(PROMPT), 4
    g = explain_generation(model, None, PROMPT, max_new_tokens=k)
    assert g.matrix.shape == (k, n + k) and torch.isfinite(g.matrix).all()
    # greedy: each generated token is the argmax after the previous ones
    seq = list(PROMPT)
    for i, token in enumerate(g.generated_ids):
        assert token == int(plain_logits(model, seq).argmax())
        assert rel_err(g.target_logits[i], plain_logits(model, seq)[token].item()) < 1e-4
        seq.append(token)
        # causality: nothing at or after the token being predicted gets relevance
        assert (g.matrix[i, n + i:] == 0).all()
        assert (g.matrix[i, : n + i] != 0).any()
        # each row is the single-token explanation of that step
        row = explain(model, None, seq[:-1], target=token).relevance
        torch.testing.assert_close(g.matrix[i, : n + i], row, atol=1e-5, rtol=1e-4)


def test_generation_stops_at_eos(hf_checkpoint):
    model = load(hf_checkpoint, "llama3")
    first = explain_generation(model, None, PROMPT, max_new_tokens=3).generated_ids

    class Tok:
        eos_ids = [first[0]]

        def decode(self, ids):
            return ",".join(map(str, ids))

    g = explain_generation(model, Tok(), PROMPT, max_new_tokens=3)
    assert g.generated_ids == first[:1] and g.matrix.shape == (1, len(PROMPT) + 1)

"""Latent relevances on every family of tests/families.py: per-head attention and per-neuron (per
expert) MLP relevances exist with the documented shapes, and each branch's latents hold exactly what
that branch passes on.

The oracle is the test's own measurement on the same forward, not the recorder: forward hooks take
each branch's output y and input h; Σ y · ∂logit/∂y is what the branch hands to the residual stream,
and h · (∂y/∂h)ᵀ ∂logit/∂y is the relevance at its input through that branch alone. On a bias-free
copy (every bias parameter zeroed) under CP-LRP both equal the sum of the branch's latent relevances:
the first because each latent enters a map linear in it (the output projection, the experts' down
products; routing weights are constants), the second because CP-LRP conserves through a bias-free
branch."""

import pytest
import torch
from torch import nn

import lucidlm
from lucidlm import GPT, Config
from lucidlm.errors import ExplainError
from lucidlm.explain.components import ablated, component_values
from lucidlm.explain.explainer import explain
from lucidlm.model import rules
from lucidlm.model.latents import neurons_of
from families import FAMILIES

PROMPT = [5, 17, 33, 8, 61, 12, 40, 3]


def bias_free(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.zero_()
    return model


def branch_relevances(model, ids, target: int) -> dict[str, tuple[float, float]]:
    """``attn{i}``/``mlp{i}`` -> (Σ y · ∂logit/∂y at the branch output, the relevance at its input
    through that branch only), under cp-lrp."""
    seen = {}

    def keep(name):
        def hook(_module, args, output):
            seen[name] = (args[0], output)
        return hook

    handles = [getattr(block, part).register_forward_hook(keep(f"{part}{i}"))
               for i, block in enumerate(model.layers) for part in ("attn", "mlp")]
    pos = torch.arange(len(ids))[None]
    h0 = model.embed_tokens(torch.tensor([ids]), pos).detach().requires_grad_()
    try:
        with rules.explaining("cp-lrp"):
            logit = model(inputs_embeds=h0, last_only=True)[0, -1, target]
    finally:
        for h in handles:
            h.remove()
    names = list(seen)
    out_grads = torch.autograd.grad(logit, [seen[n][1] for n in names], retain_graph=True)
    result = {}
    for name, g in zip(names, out_grads):
        h, y = seen[name]
        (g_in,) = torch.autograd.grad(y, h, grad_outputs=g, retain_graph=True)
        result[name] = ((y * g).sum().item(), (h * g_in).sum().item())
    return result


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_latent_relevances_hold_each_branch(family, hf_checkpoint):
    _, directory = hf_checkpoint(family)
    model = bias_free(lucidlm.LLM.load(directory, dtype=torch.float64).model.eval())
    c = model.config
    e = explain(model, None, PROMPT, method="cp-lrp", layers="all")
    measured = branch_relevances(model, PROMPT, e.target_ids[0])
    for i in range(c.n_layer):
        attn, mlp = e.layers[f"layers.{i}.attn"], e.layers[f"layers.{i}.mlp"]
        shared = e.layers.get(f"layers.{i}.shared_mlp")
        # shapes: heads (JetMoE: every attention expert's heads), neurons (per routed expert)
        assert attn.shape == ((c.n_expert * c.n_query_groups,) if c.moa else (c.n_head,))
        routed = mlp.dim() == 2
        assert mlp.shape[0] == (c.n_expert if routed else mlp.numel())
        assert (shared is not None) == (routed and bool(c.shared_expert_intermediate_size or c.n_shared_experts))
        mlp_sum = mlp.double().sum().item() + (shared.double().sum().item() if shared is not None else 0.0)
        for name, total in ((f"attn{i}", attn.double().sum().item()), (f"mlp{i}", mlp_sum)):
            out, into = measured[name]
            assert abs(out) > 1e-6, f"{family}: {name} passes no relevance, the test proves nothing"
            assert rel_err(total, out) < 1e-4, (family, name, total, out)
            assert rel_err(total, into) < 1e-4, (family, name, total, into)


@pytest.mark.parametrize("family", ["gpt-oss", "dbrx", "jetmoe", "deepseek-v3"])
def test_ablating_a_component_removes_its_latent(family, hf_checkpoint):
    """The ablation targets the same tensors the relevances are recorded on: a zeroed head or expert
    neuron records zero relevance, and ablating a whole layer zeroes all of its latents."""
    _, directory = hf_checkpoint(family)
    model = lucidlm.LLM.load(directory, dtype=torch.float64).model.eval()
    layer = model.config.n_layer - 1
    e = explain(model, None, PROMPT, layers=[layer])
    heads = component_values(e.layers, "heads")
    neurons = component_values(e.layers, "neurons")
    head = max(heads, key=lambda k: abs(heads[k]))
    neuron = max(neurons, key=lambda k: abs(neurons[k]))
    assert heads[head] != 0 and neurons[neuron] != 0
    with ablated(model, [head, neuron]):
        cut = explain(model, None, PROMPT, target=e.target_ids[0], layers=[layer])
    assert component_values(cut.layers, "heads")[head] == 0
    assert component_values(cut.layers, "neurons")[neuron] == 0
    with ablated(model, [f"layers.{layer}"]):
        gone = explain(model, None, PROMPT, target=e.target_ids[0], layers=[layer])
    assert all((v == 0).all() for v in gone.layers.values())


class PlainMLP(nn.Module):
    """A custom MLP (``Config.mlp_class``) that names no latents."""

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(rules.activation(torch.relu, self.up(x)))


class NamedMLP(PlainMLP):
    def latents(self):
        return {"mlp": neurons_of(self.down)}


def custom(mlp_class):
    torch.manual_seed(0)
    config = Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, intermediate_size=48, mlp_class=mlp_class)
    return GPT(config).double().eval()


def test_a_custom_mlp_names_its_latents_or_gets_a_typed_error():
    with pytest.raises(ExplainError, match=r"PlainMLP \(a block's mlp\) declares no latents\(\)"):
        explain(custom(PlainMLP), None, PROMPT[:5], layers="all")
    model = custom(NamedMLP)
    e = explain(model, None, PROMPT[:5], method="cp-lrp", layers="all")
    measured = branch_relevances(model, PROMPT[:5], e.target_ids[0])
    assert e.layers["layers.1.mlp"].shape == (48,)
    assert rel_err(e.layers["layers.1.mlp"].double().sum().item(), measured["mlp1"][0]) < 1e-4
    j = int(e.layers["layers.1.mlp"].abs().argmax())
    with ablated(model, [f"layers.1.mlp.neuron.{j}"]):
        cut = explain(model, None, PROMPT[:5], target=e.target_ids[0], layers=[1])
    assert e.layers["layers.1.mlp"][j] != 0 and cut.layers["layers.1.mlp"][j] == 0

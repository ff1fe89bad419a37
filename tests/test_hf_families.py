"""Every causal-LM family lucidlm implements natively is explainable by patching ``transformers``.

Family by family (tiny random configs of tests/families.py, the same weights on both sides):

* the oracle is lucidlm's native model (``lucidlm.LLM.load`` of the saved ``transformers``
  model), an independent implementation of the same rules: the patched ``transformers`` model's
  relevance equals it, for AttnLRP and CP-LRP;
* nothing is left unpatched (no ``UnpatchedModuleWarning``) and the forward is unchanged;
* with every bias at zero, in float64, CP-LRP's relevances sum to the explained logit.

A new family is one row of ``lucidlm.hf.models.transformers_lm.FAMILIES`` and one entry of
:data:`PATCHED` here (the tests/families.py config name).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lucidlm
from lucidlm import hf
from lucidlm.errors import PatchError

PROMPT = [1, 17, 42, 5, 63, 8, 29, 77, 11]
METHODS = ["attnlrp", "cp-lrp"]
#: tests/families.py configs, at least one per native family (lucidlm.families.table)
PATCHED = [
    "llama2", "llama3", "smollm2", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
    "stablelm", "stablelm-parallel", "smollm3", "olmo", "olmo2", "granite", "cohere", "cohere-qk-norm",
    "phi2", "phi3", "gpt2", "gptj", "qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3", "falcon",
    "falcon-new", "pythia", "pythia-sequential", "gpt-oss", "starcoder2", "persimmon",
    "arcee", "nemotron", "apertus", "glm", "glm4", "glm4-no-bias", "cohere2", "exaone4", "exaone4-global", "olmo3",
    "olmoe", "granitemoe", "phimoe", "dbrx", "jetmoe",
]


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    """family -> (transformers model, native lucidlm.LLM of the same weights), built once, both in
    float64 so that the comparison sees the rules rather than float32 rounding."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model, directory = hf_checkpoint(family)
            model = copy.deepcopy(model).double()
            if model.config._experts_implementation is not None:  # grouped_mm has no float64 kernel
                model.set_experts_implementation("eager")
            cache[family] = (model, lucidlm.LLM.load(directory, dtype=torch.float64))
        return cache[family]

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", PATCHED)
def test_patched_relevance_equals_native(pair, family, method):
    model, llm = pair(family)
    with torch.no_grad():
        plain = model(torch.tensor([PROMPT])).logits[0, -1]
    target = int(plain.argmax())
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.UnpatchedModuleWarning)
        ours = hf.attribute(model, PROMPT, target=target, method=method)
    theirs = llm.explain(PROMPT, target=target, method=method)
    # the patches change the backward only: the explained logit is the unpatched model's
    assert float(ours.logit) == pytest.approx(float(plain[target]), rel=1e-6, abs=1e-6)
    assert float(ours.logit) == pytest.approx(theirs.target_logit, rel=1e-6, abs=1e-6)
    # the native explanation is returned in float32
    assert rel_err(ours.relevance, theirs.relevance) < 1e-5, (ours.relevance, theirs.relevance)


@pytest.mark.parametrize("family", PATCHED)
def test_cp_lrp_conserves_without_biases(pair, family):
    model = copy.deepcopy(pair(family)[0])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    a = hf.attribute(model, PROMPT, method="cp-lrp")
    assert a.relevance.dtype == torch.float64
    assert abs(float(a.relevance.sum() - a.logit)) <= 1e-6 * max(1.0, abs(float(a.logit)))


def test_every_native_family_has_a_patched_row():
    """lucidlm.families.table's architectures all map to a registered transformers family."""
    import transformers as T

    from lucidlm.families.table import FAMILIES as NATIVE
    from lucidlm.hf.registry import MODELS, REFUSED, qualname

    missing = [architecture for architecture in NATIVE
               if not any(qualname(c) in MODELS or qualname(c) in REFUSED for c in getattr(T, architecture).__mro__)]
    assert not missing, f"add a row (or a REFUSED entry) to lucidlm/hf/models/transformers_lm.py for {missing}"


def test_a_refused_family_says_why():
    import transformers as T

    from lucidlm.hf.registry import REFUSED, refuse

    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with REFUSED.scoped():
        refuse("transformers.models.bloom.modeling_bloom.BloomPreTrainedModel", "ALiBi has no rule here")
        with pytest.raises(PatchError, match=r"BloomForCausalLM .* cannot be explained by patching: ALiBi"):
            hf.explainable(model)


# ----------------------------------------------------------------------------- what is refused


def test_experts_with_an_unknown_gate_are_refused_by_name(hf_checkpoint):
    """An experts module whose gated non-linearity has no rule here is an error naming it, not an
    approximation."""
    model = copy.deepcopy(hf_checkpoint("mixtral")[0])
    experts = model.model.layers[0].mlp.experts
    odd = type("OddExperts", (type(experts),), {"_apply_gate": lambda self, gate_up: gate_up.tanh()})
    experts.__class__ = odd
    with pytest.raises(PatchError, match="OddExperts"):
        hf.explainable(model)
    assert not any("forward" in vars(m) for m in model.modules())  # nothing half-patched is left


def test_a_norm_the_probe_cannot_reproduce_stays_unpatched_and_is_named(hf_checkpoint):
    model = copy.deepcopy(hf_checkpoint("llama2")[0])
    norm = model.model.norm
    odd = type("OddRMSNorm", (type(norm),), {"forward": lambda self, x: torch.tanh(x) * self.weight})
    norm.__class__ = odd
    with pytest.warns(hf.UnpatchedModuleWarning, match=r"model\.norm \(OddRMSNorm\)"):
        hf.explainable(model).remove()


def test_the_attention_key_selects_nothing_else(hf_checkpoint):
    """Registering lucidlm's attention function is global but inert: a model loaded with it and no
    method in force computes plain attention."""
    model = copy.deepcopy(hf_checkpoint("gemma2")[0])
    with torch.no_grad():
        before = model(torch.tensor([PROMPT])).logits
    with hf.explainable(model):
        pass  # registers the key
    model.config._attn_implementation = "lucidlm_lrp"
    with torch.no_grad():
        after = model(torch.tensor([PROMPT])).logits
    assert torch.allclose(before, after, atol=1e-5)


# ----------------------------------------------------------------------------- loading options


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma3", "olmo", "qwen2-moe", "deepseek-v3", "falcon",
                                    "dbrx", "jetmoe"])
def test_sdpa_loaded_model_explains_as_the_eager_one(hf_checkpoint, family):
    """The model's mask differs with its attention implementation (SDPA's boolean mask, or none
    at all for a plain causal prompt, against eager's additive one): the relevances do not."""
    import transformers as T

    eager = hf_checkpoint(family)[0]
    sdpa = T.AutoModelForCausalLM.from_config(copy.deepcopy(eager.config), attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    sdpa.eval()
    assert sdpa.config._attn_implementation == "sdpa"
    for method in METHODS:
        want = hf.attribute(eager, PROMPT, target=5, method=method).relevance
        got = hf.attribute(sdpa, PROMPT, target=5, method=method).relevance
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("family", ["llama3", "gemma2", "olmo2", "cohere-qk-norm", "gpt-oss", "deepseek-v3", "phi2",
                                    "dbrx", "jetmoe", "apertus"])
def test_bfloat16_model_is_fully_patched(hf_checkpoint, family):
    """The structural probe recognises the norms and MLPs in half precision too."""
    model = copy.deepcopy(hf_checkpoint(family)[0]).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.UnpatchedModuleWarning)
        a = hf.attribute(model, PROMPT, method="attnlrp")
    assert torch.isfinite(a.relevance).all()


def test_structure_covers_a_family_no_row_names():
    """Nemotron, registered here by structure alone (as its row does): its LayerNorm1P subclasses
    nn.LayerNorm but scales by 1 + weight, so the generic LayerNorm patch must not take it; the
    probe finds the unit offset. The forward is unchanged and CP-LRP conserves without biases."""
    import transformers as T

    from lucidlm.hf.registry import MODELS

    torch.manual_seed(0)
    config = T.NemotronConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = T.NemotronForCausalLM(config).eval().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else p + torch.randn_like(p) * 0.05)
        plain = model(torch.tensor([PROMPT])).logits
    with MODELS.scoped():
        hf.register("transformers.models.nemotron.modeling_nemotron.NemotronPreTrainedModel", name="Nemotron",
                    structural=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", hf.UnpatchedModuleWarning)
            with hf.explainable(model, "cp-lrp"):
                norm = model.model.layers[0].input_layernorm
                assert "layer_norm_like" in vars(norm)["forward"].__qualname__
                with torch.no_grad():
                    assert torch.allclose(model(torch.tensor([PROMPT])).logits, plain, atol=1e-6)
                a = hf.attribute(model, PROMPT)
    assert abs(float(a.relevance.sum() - a.logit)) <= 1e-6 * max(1.0, abs(float(a.logit)))

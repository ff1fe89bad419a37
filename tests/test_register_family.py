"""A family registered from outside the package (this file) loads an HF-style directory: a
config mapping plus a weight-name layout, no edit inside ``lucidlm/``."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lucidlm
from lucidlm.checkpoints.layouts import Layout
from lucidlm.errors import ConfigError

# a Llama whose checkpoint calls things by other names
RENAMES = (("backbone.embed.", "embed."), ("backbone.final_norm.", "final_norm."), ("head.", "lm_head."),
           ("backbone.blocks.{i}.attention.", "layers.{i}.attn."), ("backbone.blocks.{i}.ffn.", "layers.{i}.mlp."),
           ("backbone.blocks.{i}.norm_1.", "layers.{i}.attn_norm."),
           ("backbone.blocks.{i}.norm_2.", "layers.{i}.mlp_norm."))
HF_NAMES = (("model.embed_tokens.", "backbone.embed."), ("model.norm.", "backbone.final_norm."), ("lm_head.", "head."),
            ("self_attn.", "attention."), ("mlp.", "ffn."), ("input_layernorm.", "norm_1."),
            ("post_attention_layernorm.", "norm_2."), ("model.layers.", "backbone.blocks."))


@pytest.fixture(autouse=True)
def restore_registries():
    """Registrations are process-wide: undo this file's, so other tests see the shipped families."""
    from lucidlm.checkpoints.layouts import LAYOUTS
    from lucidlm.families import FAMILIES
    from lucidlm.registry import scoped

    with scoped(FAMILIES, LAYOUTS):
        yield


def rename(name: str) -> str:
    for old, new in HF_NAMES:
        name = name.replace(old, new)
    return name


def test_a_family_registered_from_outside_loads(hf_checkpoint, tmp_path):
    hf_model, directory = hf_checkpoint("llama2")
    state = load_file(directory / "model.safetensors")
    save_file({rename(k): v for k, v in state.items()}, tmp_path / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config.update(architectures=["ToyLMForCausalLM"], model_type="toylm")
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(lucidlm.errors.UnsupportedArchitectureError, match="ToyLMForCausalLM"):
        lucidlm.LLM.load(tmp_path)
    family = lucidlm.Family("ToyLMForCausalLM", layout="toylm", traits=dict(norm="rmsnorm", mlp="glu"),
                            defaults=dict(rms_norm_eps=1e-6, tie_word_embeddings=False), model_type="toylm")
    lucidlm.register_family(family, Layout(RENAMES, prefix="backbone."))
    llm = lucidlm.LLM.load(tmp_path)
    ids = torch.randint(3, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), hf_model(ids).logits, atol=1e-5, rtol=1e-5)
    # saving writes the family's own names back
    llm.save(tmp_path / "saved")
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == {rename(k) for k in state}


def test_registering_without_a_known_layout_is_an_error():
    family = lucidlm.Family("NoLayoutForCausalLM", layout="nowhere", traits={})
    with pytest.raises(ConfigError, match="layout 'nowhere' is unknown"):
        lucidlm.register_family(family)

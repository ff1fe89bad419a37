"""LLaMA-Adapter and AdapterV2 against LitGPT 0.5.13's own modules (the oracle), both ways.

For tiny random models of several families: LitGPT's adapter GPT gets the same base weights
(converted from the ``transformers`` checkpoint by LitGPT's own ``convert_hf_checkpoint`` copy
functions) and its config from :func:`lucidlm.train.adapter_files.litgpt_config`, then

* (a) LitGPT's adapter file (random adapter tensors, gates non-zero), laid out as ``litgpt finetune``
  writes its ``final/`` folder, loads into lucidlm with ``LLM.load(base, adapter=DIR)``: the logits
  equal LitGPT's;
* (b) an adapter made here (random, gates non-zero) and saved by ``save_litgpt_adapter`` loads into
  LitGPT the way ``litgpt/generate/adapter*.py`` loads it: the logits equal ours.

LitGPT is imported from ``.venv-litgpt`` (the ``litgpt`` fixture of conftest.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lucidlm import LLM
from lucidlm.train.adapter import adapter_state, attach_adapter
from lucidlm.train.adapter_files import CONFIG_YAML, WEIGHTS, litgpt_config, save_litgpt_adapter

TOL = dict(atol=2e-5, rtol=1e-5)
PROMPT_LENGTH, START_LAYER = 3, 1

#: tests/families.py case -> LitGPT's function converting its transformers weights
CASES = {
    "smollm2": "copy_weights_hf_llama",  # Llama, multi-query (one KV head), tied embeddings
    "llama3": "copy_weights_hf_llama",  # Llama, grouped-query (2 KV heads), llama3 RoPE scaling
    "mistral": "copy_weights_hf_llama",  # sliding window, head_dim 24 != n_embd / n_head
    "qwen2": "copy_weights_qwen_2_5",  # q/k/v biases
    "gemma": "copy_weights_hf_llama",  # GemmaMLP (GELU), unit-offset RMSNorm, scaled embeddings, MQA
    "gemma2": "copy_weights_gemma_2",  # soft-capping, sandwich norms, query_pre_attn_scalar, alternating windows
    "phi2": "copy_weights_phi",  # parallel residual, shared norm, LayerNorm, biases, partial rotary
    "pythia-sequential": "copy_weights_gpt_neox",  # GPT-NeoX (fused qkv reassembled), LayerNorm, biases
}
VERSIONS = ("adapter", "adapter_v2")


def ids_for(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 9), generator=g)


def litgpt_base(litgpt, family: str, hf_model, fields: dict) -> dict[str, torch.Tensor]:
    """The base weights in LitGPT's names, converted by LitGPT's own copy function."""
    from litgpt.config import Config

    convert = getattr(litgpt.scripts.convert_hf_checkpoint, CASES[family])
    hf = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    base_fields = {k: v for k, v in fields.items() if not k.startswith("adapter_")}
    config, state = Config(**base_fields), {}
    if CASES[family] == "copy_weights_gpt_neox":
        hf["embed_out.weight"] = hf.pop("lm_head.weight")  # transformers 5 renamed NeoX's head
        convert(config, state, hf)
    elif CASES[family] == "copy_weights_gemma_2":
        convert({}, state, hf)
    else:
        convert(config, {}, state, hf)
    return state


def litgpt_model(litgpt, version: str, fields: dict, base: dict[str, torch.Tensor]):
    module = getattr(litgpt, version)
    model = module.GPT(module.Config(**fields))
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert not unexpected
    assert all(module.adapter_filter(k, None) for k in missing), missing  # only the adapter is left out
    return model.eval()


def litgpt_logits(model, ids: torch.Tensor) -> torch.Tensor:
    for block in model.transformer.h:  # LitGPT caches the prefix's keys/values at the first call
        if hasattr(block.attn, "adapter_kv_cache"):
            block.attn.adapter_kv_cache = None
    with torch.no_grad():
        return model(ids)


def randomize(named: dict[str, torch.Tensor], seed: int) -> None:
    """Every adapter tensor random: gates non-zero, V2 scales around one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(named.items()):
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2
            scale_like = name.endswith(("adapter_scale", "norm.weight", "norm_1.weight", "norm_2.weight",
                                        "ln_f.weight"))
            p.copy_(1 + noise if scale_like else noise * (5 if "gating_factor" in name else 1))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("family", sorted(CASES))
def test_litgpt_file_loads_into_lucidlm(family, version, litgpt, hf_checkpoint, tmp_path):
    import yaml
    from litgpt.config import Config

    hf_model, directory = hf_checkpoint(family)
    llm = LLM.load(directory)
    fields, missing = litgpt_config(llm.config, PROMPT_LENGTH, START_LAYER)
    assert not missing
    lit = litgpt_model(litgpt, version, fields, litgpt_base(litgpt, family, hf_model, fields))
    module = getattr(litgpt, version)
    adapter = {k: p for k, p in lit.named_parameters() if module.adapter_filter(k, p)}
    randomize(adapter, seed=7)
    # what `litgpt finetune adapter(_v2)` leaves: final/ with the weights and the base's model_config.yaml
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    torch.save({"model": {k: p.detach().clone() for k, p in adapter.items()}}, final / WEIGHTS[version])
    base_fields = {k: v for k, v in fields.items() if not k.startswith("adapter_")}
    (final / CONFIG_YAML).write_text(yaml.dump(dataclasses.asdict(Config(**base_fields))))
    tuned = LLM.load(directory, adapter=tmp_path / "run")
    ids = ids_for(llm.config.vocab_size)
    with torch.no_grad():
        ours = tuned.model(ids)
    expected = litgpt_logits(lit, ids)
    assert (ours - llm.model(ids)).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(ours, expected[..., :llm.config.vocab_size], **TOL)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("family", sorted(CASES))
def test_our_file_loads_into_litgpt(family, version, litgpt, hf_checkpoint, tmp_path):
    from litgpt.utils import lazy_load

    hf_model, directory = hf_checkpoint(family)
    llm = LLM.load(directory)
    llm.model.eval()
    attach_adapter(llm.model, version, PROMPT_LENGTH, START_LAYER)
    randomize(adapter_state(llm.model), seed=11)
    save_litgpt_adapter(llm.model, tmp_path, base_model="org/" + family)
    # litgpt/generate/adapter(_v2).py: Config.from_file(model_config.yaml), the base checkpoint
    # updated with the adapter file's "model", load_state_dict (strict)
    module = getattr(litgpt, version)
    config = module.Config.from_file(tmp_path / CONFIG_YAML)
    assert (config.adapter_prompt_length, config.adapter_start_layer) == (PROMPT_LENGTH, START_LAYER)
    lit = module.GPT(config)
    fields, _ = litgpt_config(llm.config)
    checkpoint = litgpt_base(litgpt, family, hf_model, fields)
    adapter = lazy_load(tmp_path / WEIGHTS[version])
    checkpoint.update(adapter.get("model", adapter))
    lit.load_state_dict(checkpoint)
    lit.eval()
    ids = ids_for(llm.config.vocab_size, seed=2)
    with torch.no_grad():
        ours = llm.model(ids)
    torch.testing.assert_close(litgpt_logits(lit, ids)[..., :llm.config.vocab_size], ours, **TOL)

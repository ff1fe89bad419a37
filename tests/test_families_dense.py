"""Dense families of issue 26 (Starcoder2, ...) beyond what every family gets from
tests/test_parity.py, test_check.py and test_explain.py (logits, saving back, prefill + decode,
conservation checks, both LRP methods): greedy tokens through our KV cache equal transformers'
``generate`` (the oracle), and CP-LRP conserves exactly on the bias-free ones."""

import copy

import pytest
import torch

import lucidlm
from lucidlm.explain.explainer import explain
from lucidlm.generate import generate_ids

NEW_FAMILIES = ["starcoder2", "persimmon", "cohere2", "exaone4", "exaone4-global", "olmo3", "arcee", "nemotron",
                "apertus", "glm", "glm4"]
BIAS_FREE = ["arcee", "apertus", "glm4-no-bias"]  # RMSNorm, no biases: CP-LRP's relevances sum to the logit
PROMPT = [5, 17, 3, 42, 8, 11, 60, 23]  # longer than every window of these tiny configs (4 or 5)
N_NEW = 12


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, running past EOS as ``generate_ids`` does (``min_new_tokens``
    would instead forbid EOS, and a tiny random model picks it)."""
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=[], max_new_tokens=n, do_sample=False, pad_token_id=0)
    out = model.generate(torch.tensor([ids]), generation_config=config,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_cached_greedy_tokens_equal_transformers_generate(family, hf_checkpoint):
    hf_model, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    ours = [step[0] for step in generate_ids(llm.model, [PROMPT], N_NEW)]
    assert ours == hf_greedy(hf_model, PROMPT, N_NEW)


def test_litgpt_export_names_what_litgpt_cannot_express(hf_checkpoint):
    """LitGPT has neither ReLU² nor Persimmon's shared q/k LayerNorm: the adapter export must say so
    rather than write a model_config.yaml that builds a different model."""
    from lucidlm.train.adapter_files import litgpt_config

    _, directory = hf_checkpoint("persimmon")
    _, missing = litgpt_config(lucidlm.LLM.load(directory).config)
    assert "activation='relu2'" in missing and "qk_norm='layernorm_head'" in missing


@pytest.mark.parametrize("family", BIAS_FREE)
def test_cp_lrp_conserves_on_bias_free_families(family, hf_checkpoint):
    _, directory = hf_checkpoint(family)
    e = explain(lucidlm.LLM.load(directory).model, None, PROMPT, method="cp-lrp", objective="logit")
    assert abs(float(e.relevance.double().sum()) - e.target_logit) < 1e-4 * max(1.0, abs(e.target_logit))


def test_xielu_outside_a_plain_mlp_is_a_config_error():
    from lucidlm.config import Config
    from lucidlm.errors import ConfigError

    with pytest.raises(ConfigError, match="activation='xielu' needs mlp='mlp'"):
        Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, mlp="glu", activation="xielu")

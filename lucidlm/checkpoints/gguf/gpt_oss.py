"""gpt-oss GGUF files (llama.cpp's ``gpt-oss`` architecture, ``GptOssForCausalLM``).

llama.cpp's converter changes three things that a table of names cannot undo, which
:func:`gpt_oss_tensors` puts back after the renaming:

* transformers' fused experts ``gate_up_proj`` (experts, hidden, 2 * ff) hold the gate and up
  columns interleaved (gate, up, gate, up, ...); llama.cpp splits them into ``ffn_gate_exps`` and
  ``ffn_up_exps`` of (experts, ff, hidden) each, and their biases likewise;
* ``down_proj`` (experts, ff, hidden) is stored transposed, as ``ffn_down_exps`` (experts, hidden, ff);
* the sinks, a bare ``sinks`` parameter, became ``attn_sinks.weight``.

What the file leaves out, :func:`gpt_oss_config` takes from llama.cpp's gpt-oss runtime (which
fixes it in code, ``llama-graph.cpp`` and ``models/openai-moe.cpp``): the SwiGLU's alpha 1.702 and
limit 7.0, and the layer pattern (``attention.sliding_window_pattern``, default 2: even layers slide).
The YaRN correction range is not truncated (``truncate: false``), as in every published gpt-oss
``config.json`` and transformers' model; llama.cpp's runtime rounds it to whole dimensions.

Published gpt-oss GGUFs keep the experts in MXFP4 (ggml type 39); gguf's dequantiser reads them.
Export does the converter's changes (:func:`gpt_oss_split`) and refuses what llama.cpp would not run
as the model computes it (another SwiGLU limit or layer pattern, truncated YaRN: :mod:`.hparams`).

>>> import torch
>>> gate, up = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)  # (experts, ff, hidden)
>>> state = {"model.layers.0.mlp.experts.gate_proj.weight": gate, "model.layers.0.mlp.experts.up_proj.weight": up}
>>> fused = gpt_oss_tensors(state)["model.layers.0.mlp.experts.gate_up_proj"]
>>> tuple(fused.shape), fused[0, 0].tolist()
((1, 3, 4), [0.0, 1.0, 0.0, 1.0])
"""

from __future__ import annotations

from typing import Any

import torch

from .reader import Keys
from .yarn import yarn_parameters

# llama.cpp hard-codes gpt-oss's clamped SwiGLU (LLM_FFN_SWIGLU_OAI_MOE)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
# llama.cpp's default gpt-oss layer pattern: of every 2 layers, the first slides
SWA_PERIOD = 2

# GGUF block leaf -> module under model.layers.N (the experts under temporary names gpt_oss_tensors fuses)
GPT_OSS_BLOCKS = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "attn_sinks": "self_attn.sinks",
    "ffn_gate_inp": "mlp.router",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}


def gpt_oss_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    """``config.json`` of ``GptOssForCausalLM`` from a ``gpt-oss`` file's metadata.

    Raises:
        GGUFError: a key is missing or of the wrong type, the file scales RoPE other than by YaRN or
            gives the sliding layers another RoPE base.
    """
    hidden, heads = k.integer("embedding_length"), k.integer("attention.head_count")
    n_layer = k.integer("block_count")
    theta = k.number("rope.freq_base", 10000.0)
    if (local := k.number("rope.freq_base_swa", theta)) != theta:
        raise k.error("rope.freq_base_swa", local, f"the full layers' rope.freq_base {theta} (GptOssForCausalLM "
                                                   "rotates every layer alike)")
    return {
        "hidden_size": hidden,
        "intermediate_size": k.integer("expert_feed_forward_length"),
        "num_hidden_layers": n_layer,
        "num_attention_heads": heads,
        "num_key_value_heads": k.integer("attention.head_count_kv", heads),
        "head_dim": k.integer("attention.key_length", hidden // heads),
        "rms_norm_eps": k.number("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": theta,
        "rope_parameters": yarn_parameters(k, theta, truncate=False),
        "max_position_embeddings": k.integer("context_length"),
        "num_local_experts": k.integer("expert_count"),
        "num_experts_per_tok": k.integer("expert_used_count"),
        "sliding_window": k.integer("attention.sliding_window"),
        "layer_types": _layer_types(k, n_layer),
        "swiglu_alpha": SWIGLU_ALPHA,
        "swiglu_limit": SWIGLU_LIMIT,
        "attention_bias": True,
        "hidden_act": "silu",
    }


def _layer_types(k: Keys, n_layer: int) -> list[str]:
    """llama.cpp's ``set_swa_pattern(period)``: layer ``i`` slides when ``i % period < period - 1``
    (every layer when the period is 0)."""
    period = k.integer("attention.sliding_window_pattern", SWA_PERIOD)
    if period < 0:
        raise k.error("attention.sliding_window_pattern", period, "a period of at least 0")
    return ["sliding_attention" if period == 0 or i % period < period - 1 else "full_attention"
            for i in range(n_layer)]


def gpt_oss_tensors(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Renamed GGUF tensors -> transformers' gpt-oss state dict: the experts' gate and up fused back
    (interleaved) and transposed, ``down_proj`` transposed back, the biases and sinks under their own names."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if ".mlp.experts.up_proj." in name:
            continue  # fused with its gate below
        if ".mlp.experts.gate_proj." in name:
            up = state[name.replace(".gate_proj.", ".up_proj.")]
            fused = _interleave(value, up)
            if name.endswith(".weight"):  # (experts, 2 * ff, hidden) -> (experts, hidden, 2 * ff)
                out[name.replace("gate_proj.weight", "gate_up_proj")] = fused.transpose(1, 2).contiguous()
            else:
                out[name.replace("gate_proj.bias", "gate_up_proj_bias")] = fused
        elif name.endswith(".mlp.experts.down_proj.weight"):
            out[name.removesuffix(".weight")] = value.transpose(1, 2).contiguous()
        elif name.endswith(".mlp.experts.down_proj.bias"):
            out[name.replace("down_proj.bias", "down_proj_bias")] = value
        elif name.endswith(".self_attn.sinks.weight"):
            out[name.removesuffix(".weight")] = value
        else:
            out[name] = value
    return out


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows ``gate[0], up[0], gate[1], up[1], ...`` along dim 1: (experts, ff, ...) twice -> (experts, 2 * ff, ...)."""
    stacked = torch.stack((gate, up), dim=2)
    return stacked.reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]).contiguous()


def gpt_oss_split(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """transformers' gpt-oss state dict -> the names and layouts llama.cpp's converter writes (before
    GGUF naming): the inverse of :func:`gpt_oss_tensors`."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):  # (experts, hidden, 2 * ff): gate columns even, up odd
            rows = value.transpose(1, 2)
            out[name.replace("gate_up_proj", "gate_proj.weight")] = rows[:, ::2].contiguous()
            out[name.replace("gate_up_proj", "up_proj.weight")] = rows[:, 1::2].contiguous()
        elif name.endswith(".mlp.experts.gate_up_proj_bias"):
            out[name.replace("gate_up_proj_bias", "gate_proj.bias")] = value[:, ::2].contiguous()
            out[name.replace("gate_up_proj_bias", "up_proj.bias")] = value[:, 1::2].contiguous()
        elif name.endswith(".mlp.experts.down_proj"):
            out[name + ".weight"] = value.transpose(1, 2).contiguous()
        elif name.endswith(".mlp.experts.down_proj_bias"):
            out[name.replace("down_proj_bias", "down_proj.bias")] = value
        elif name.endswith(".self_attn.sinks"):
            out[name + ".weight"] = value
        else:
            out[name] = value
    return out

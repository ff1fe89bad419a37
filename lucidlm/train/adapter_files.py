"""LitGPT's adapter files, read and written: ``lit_model.pth.adapter`` / ``lit_model.pth.adapter_v2``
(``{"model": state dict}`` with LitGPT's names, as ``fabric.save`` writes it with
``adapter_filter``) and ``model_config.yaml`` (LitGPT's ``Config`` as YAML, with
``adapter_prompt_length`` and ``adapter_start_layer``).

A LitGPT fine-tune folder (``out/finetune/adapter/final/``) loads as it is: the prompt length and
first adapted layer are read from the tensors (LitGPT copies the base's ``model_config.yaml``,
which may not hold them); its architecture fields must equal the model's. LitGPT loads our folder
the way ``litgpt/generate/adapter*.py`` does (``Config.from_file(model_config.yaml)``, then the base
state dict updated with the file's ``"model"``).

Names: ``layers.{i}`` is ``transformer.h.{i}``, ``attn_norm``/``mlp_norm``/``final_norm`` are
``norm_1``/``norm_2``/``transformer.ln_f``, ``o_proj`` is ``proj``, the GLU's
``gate_proj``/``up_proj``/``down_proj`` are ``fc_1``/``fc_2``/``proj`` (a plain MLP's
``up_proj``/``down_proj``: ``fc``/``proj``), the MoE router is ``gate``; our ``q_proj``/``k_proj``/
``v_proj`` are the rows [Q; K; V] of LitGPT's fused ``attn.qkv`` (its 0.5 layout), so V2's bias and
scale split and fuse exactly.

>>> import tempfile, torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.train.adapter import attach_adapter
>>> model = GPT(Config.from_name("tiny-llama"))
>>> attach_adapter(model, "adapter_v2", prompt_length=3, start_layer=1)
>>> out = save_litgpt_adapter(model, tempfile.mkdtemp())
>>> sorted(p.name for p in out.iterdir())  # and the base weights' fingerprint (lucidlm's)
['lit_model.pth.adapter_v2', 'lucidlm_base.json', 'model_config.yaml']
>>> litgpt_name("layers.1.attn.k_proj.adapter_bias", model)
('transformer.h.1.attn.qkv.adapter_bias', 1)
>>> fresh = GPT(Config.from_name("tiny-llama"))  # other random weights: the base check would refuse
>>> load_litgpt_adapter(fresh, out, check_base=False)["adapter_start_layer"]
1
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..fileio import atomic_path, atomic_write
from ..model.mlp import MLP
from .adapter import adapter_settings, adapter_state, adapter_version, attach_adapter
from .base_check import PYTHON_HINT, check_fingerprint, write_fingerprint
from .names import ADAPTER_METHODS

CONFIG_YAML = "model_config.yaml"
#: the weights file of each version, as LitGPT's finetune scripts name it
WEIGHTS = {version: f"lit_model.pth.{version}" for version in ADAPTER_METHODS}
#: the fields of model_config.yaml that must equal the model's for an adapter to fit it
ARCHITECTURE = ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size",
                "moe_intermediate_size", "n_expert", "n_expert_per_token", "mlp_class_name", "norm_class_name",
                "parallel_residual", "shared_attention_norm", "bias", "attn_bias", "lm_head_bias")

_GLU_NAMES = {"gate_proj": "fc_1", "up_proj": "fc_2", "down_proj": "proj", "router": "gate"}
_MLP_NAMES = {"up_proj": "fc", "down_proj": "proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


# ----------------------------------------------------------------------------- names
def litgpt_name(ours: str, model: nn.Module) -> tuple[str, int | None]:
    """LitGPT's name of our parameter ``ours``, and which part of the fused ``qkv`` it is (0, 1, 2:
    q, k, v; ``None``: not fused)."""
    parts = ours.split(".")
    if parts[0] == "final_norm":
        return ".".join(["transformer", "ln_f", *parts[1:]]), None
    if parts[0] != "layers":
        return ours, None
    i, rest = int(parts[1]), parts[2:]
    index = None
    if rest[0] in ("attn_norm", "mlp_norm"):
        rest = ["norm_1" if rest[0] == "attn_norm" else "norm_2", *rest[1:]]
    elif rest[0] == "attn" and len(rest) > 2 and rest[1] in _QKV:
        index, rest = _QKV[rest[1]], ["attn", "qkv", *rest[2:]]
    elif rest[0] == "attn" and len(rest) > 2 and rest[1] == "o_proj":
        rest = ["attn", "proj", *rest[2:]]
    elif rest[0] == "mlp":
        table = _MLP_NAMES if isinstance(model.layers[i].mlp, MLP) else _GLU_NAMES
        rest = [table.get(p, p) for p in rest[:-1]] + rest[-1:]
    return ".".join(["transformer", "h", str(i), *rest]), index


def _qkv_sizes(config) -> list[int]:
    return [config.n_head * config.head_size, *[config.n_query_groups * config.head_size] * 2]


def litgpt_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under LitGPT's names (V2's q/k/v bias and scale fused)."""
    state: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for ours, p in adapter_state(model).items():
        name, index = litgpt_name(ours, model)
        tensor = p.detach().cpu().contiguous()
        if index is None:
            state[name] = tensor
        else:
            fused.setdefault(name, {})[index] = tensor
    for name, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise AdapterError(f"{name}: q, k and v must all carry the adapter to be saved as LitGPT's fused qkv")
        state[name] = torch.cat([parts[j] for j in range(3)])
    return state


# ----------------------------------------------------------------------------- model_config.yaml
def litgpt_config(config, prompt_length: int | None = None, start_layer: int | None = None,
                  base_model: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """LitGPT's ``Config`` fields for a lucidlm :class:`~lucidlm.Config`, and what LitGPT cannot
    express (an empty list when LitGPT builds the same model)."""
    c, missing = config, []
    # the MoEs LitGPT has no class for are listed as missing (_inexpressible); LLaMAMoE is the nearest
    mlp = {"glu": "GemmaMLP" if c.activation in ("gelu", "gelu_tanh") else "LLaMAMLP",
           "mlp": "GptNeoxMLP"}.get(c.mlp, "LLaMAMoE")
    name = Path(str(base_model or c.name)).name or "custom"
    name = name.replace("Gemma", "gemma").replace("OLMo", "olmo")  # LitGPT reads its norms off these words
    if c.norm_unit_offset:
        name = f"Gemma-{name}"
    if not c.norm_affine:
        name = f"OLMo-{name}"
    fields: dict[str, Any] = dict(
        name=name, hf_config=_hub(base_model or (c.hf_config or {}).get("_name_or_path")),
        block_size=c.block_size, n_layer=c.n_layer, n_embd=c.n_embd, vocab_size=c.vocab_size,
        padded_vocab_size=c.vocab_size, norm_class_name="RMSNorm" if c.norm == "rmsnorm" else "LayerNorm",
        norm_eps=c.norm_eps, norm_qk=c.qk_norm is not None, norm_qk_type="olmo2" if c.qk_norm == "full" else "default",
        post_attention_norm=c.post_attention_norm, post_mlp_norm=c.post_mlp_norm,
        parallel_residual=c.parallel_residual, shared_attention_norm=c.shared_attention_norm, n_head=c.n_head,
        head_size=c.head_size, n_query_groups=c.n_query_groups, attn_bias=c.attn_bias,
        attention_logit_softcapping=c.attn_logit_softcapping, rope_base=_number(c.rope_theta),
        rotary_percentage=c.rotary_fraction, rope_interleave=c.rope_interleaved,
        intermediate_size=c.intermediate_size, bias=c.attn_out_bias, mlp_class_name=mlp,
        gelu_approximate="tanh" if c.activation == "gelu_tanh" else "none", n_expert=c.n_expert,
        n_expert_per_token=c.n_expert_per_token, scale_embeddings=c.scale_embeddings,
        lm_head_bias=c.lm_head_bias, final_logit_softcapping=c.final_logit_softcapping,
        norm_1=c.pre_norm, norm_2=c.pre_norm)
    if c.mlp == "moe":
        fields.update(moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.moe_norm_topk)
    if c.attention_scale is not None:
        fields["attention_scores_scalar"] = _number(c.attention_scale ** -2)
    if c.sliding_window is not None:
        fields.update(sliding_window_size=c.sliding_window,
                      sliding_window_indices=[int(c.is_sliding(i)) for i in range(c.n_layer)])
    fields.update(_rope_fields(c, missing))
    if prompt_length is not None:
        fields.update(adapter_prompt_length=prompt_length, adapter_start_layer=start_layer)
    missing.extend(_inexpressible(c))
    return fields, missing


def _inexpressible(c) -> list[str]:
    """Fields of ours that LitGPT 0.5.13's model has no counterpart for."""
    checks = [
        (c.position_embedding != "rope", f"position_embedding={c.position_embedding!r}"),
        (c.embedding_multiplier != 1.0, f"embedding_multiplier={c.embedding_multiplier}"),
        (c.residual_multiplier != 1.0, f"residual_multiplier={c.residual_multiplier}"),
        (c.logit_scale != 1.0, f"logit_scale={c.logit_scale}"),
        (c.clip_qkv is not None, f"clip_qkv={c.clip_qkv}"),
        (c.qk_norm in ("layernorm_per_head", "layernorm_head_weights", "layernorm_head"), f"qk_norm={c.qk_norm!r}"),
        (c.norm == "layernorm" and not c.norm_bias, "norm_bias=False"),
        (c.norm == "layernorm" and c.norm_unit_offset, "norm_unit_offset with LayerNorm"),
        (c.attn_out_bias != c.mlp_bias, f"attn_out_bias={c.attn_out_bias} with mlp_bias={c.mlp_bias}"),
        (c.attn_out_bias and not c.attn_bias, "attn_out_bias without attn_bias"),
        (c.rope_layers is not None, "rope_layers"),
        (c.rope_local_theta is not None, "rope_local_theta"),
        (c.shared_expert_intermediate_size > 0, "shared_expert_intermediate_size"),
        (c.moe_layers is not None, "moe_layers"),
        (c.mlp == "clamped_moe", "mlp='clamped_moe' (gpt-oss's biased, clamped-SwiGLU experts)"),
        (c.mlp in ("deepseek_moe", "dbrx_moe", "jetmoe_moe"), f"mlp={c.mlp!r}"),
        (c.attn_sinks, "attn_sinks"),
        (c.mlp == "moe" and not c.moe_norm_topk, "moe_norm_topk=False"),
        (c.activation in ("relu", "relu2", "xielu") or (c.mlp == "glu" and c.activation not in ("silu", "gelu", "gelu_tanh")),
         f"activation={c.activation!r}"),
        (c.mlp == "mlp" and c.activation == "silu", "activation='silu' in a plain MLP"),
        (not c.pre_norm and not (c.post_attention_norm and c.post_mlp_norm), "pre_norm=False"),
        (any(x is not None for x in (c.attention_class, c.mlp_class, c.block_class)), "custom components"),
    ]
    return [what for failed, what in checks if failed]


def _rope_fields(c, missing: list[str]) -> dict[str, Any]:
    scaling = c.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return {"rope_condense_ratio": _number(scaling["factor"])}
    if kind == "llama3":
        return {"rope_adjustments": {"factor": float(scaling["factor"]),
                                     "low_freq_factor": float(scaling["low_freq_factor"]),
                                     "high_freq_factor": float(scaling["high_freq_factor"]),
                                     "original_max_seq_len": int(scaling["original_max_position_embeddings"])}}
    if kind != "default":
        missing.append(f"rope_scaling type {kind!r}")
    return {}


def _number(x: float) -> int | float:
    """An integer where the value is one (LitGPT's YAML keeps ints as ints)."""
    return int(round(x)) if math.isclose(x, round(x), rel_tol=1e-9) else float(x)


def _hub(name: str | None) -> dict[str, str]:
    """LitGPT's ``hf_config`` (``org``, ``name``) for a hub id ``org/name``; empty for a local path."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)) and not Path(str(name)).exists():
        org, repo = str(name).split("/")
        return {"org": org, "name": repo}
    return {}


# ----------------------------------------------------------------------------- save
def save_litgpt_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write ``lit_model.pth.adapter(_v2)`` and ``model_config.yaml`` into ``directory``, each
    atomically. ``base_model``: the base's name (a hub id goes into ``hf_config``). A family that
    LitGPT cannot build gets ``lucidlm_unsupported_by_litgpt`` in the YAML (LitGPT then refuses it
    rather than build a different model); lucidlm reads it either way."""
    import yaml

    version = adapter_version(model)
    if version is None:
        raise AdapterError("the model has no adapter to save")
    prompt_length, start_layer = adapter_settings(model)
    fields, missing = litgpt_config(model.config, prompt_length, start_layer, base_model)
    if missing:
        fields["lucidlm_unsupported_by_litgpt"] = missing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS[version]) as tmp:
        torch.save({"model": litgpt_state(model)}, tmp)
    atomic_write(directory / CONFIG_YAML, yaml.safe_dump(fields, sort_keys=True))
    write_fingerprint(model, directory, base_model)  # the base check by weights, as for LoRA
    return directory


# ----------------------------------------------------------------------------- load
def find_litgpt_adapter(directory: str | Path) -> Path | None:
    """The adapter weights file in ``directory`` or its ``final/`` (a LitGPT fine-tune's output
    folder), or ``None``; a path to the file itself is returned as it is."""
    path = Path(directory)
    if path.is_file() and path.name in WEIGHTS.values():
        return path
    for folder in (path, path / "final"):
        found = [folder / name for name in WEIGHTS.values() if (folder / name).is_file()]
        if len(found) > 1:
            raise AdapterError(f"{folder}: holds both {found[0].name} and {found[1].name}: pass the file to load")
        if found:
            return found[0]
    return None


def read_litgpt_adapter(path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(version, LitGPT-named tensors, model_config.yaml or {}) of the weights file ``path``."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise AdapterError(f"{path}: cannot read LitGPT adapter weights ({type(exc).__name__}: {exc})") from None
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()) or not state:
        raise AdapterError(f"{path}: expected {{'model': {{name: tensor}}}} as LitGPT's finetune saves it")
    v2 = any(k.endswith((".adapter_bias", ".adapter_scale")) for k in state)
    version = "adapter_v2" if v2 or path.name == WEIGHTS["adapter_v2"] else "adapter"
    return version, state, _read_yaml(path.parent / CONFIG_YAML)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        return {}
    try:
        fields = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AdapterError(f"{path}: cannot read LitGPT's model config ({exc})") from None
    if not isinstance(fields, dict):
        raise AdapterError(f"{path}: expected a mapping of LitGPT Config fields")
    return fields


def load_litgpt_adapter(model: nn.Module, directory: str | Path, check_base: bool = True) -> dict[str, Any]:
    """Attach the LitGPT adapter in ``directory`` (ours, or a LitGPT fine-tune's ``final/``
    folder) to ``model``. ``check_base``: refuse a ``model_config.yaml`` whose architecture fields
    differ from the model's. Returns the YAML's fields with the adapter settings filled in."""
    path = find_litgpt_adapter(directory)
    if path is None:
        raise AdapterError(f"{directory}: no {' or '.join(WEIGHTS.values())} (in it or in its final/)")
    version, state, fields = read_litgpt_adapter(path)
    if check_base and fields:
        check_litgpt_base(fields, model.config, path.parent / CONFIG_YAML)
    if check_base:  # a file of ours also carries the base weights' fingerprint (LitGPT's do not)
        check_fingerprint(model, path.parent, fields.get("name"))
    prompt_length, start_layer = _settings(state, fields, path, len(model.layers))
    attach_adapter(model, version, prompt_length, start_layer)
    _copy_in(model, state, path)
    for p in model.parameters():  # loaded to be used: frozen (finetune marks the adapter trainable again)
        p.requires_grad_(False)
    return {**fields, "adapter_prompt_length": prompt_length, "adapter_start_layer": start_layer,
            "version": version}


def check_litgpt_base(fields: dict[str, Any], config, path: Path) -> None:
    """AdapterError naming every architecture field of ``fields`` that differs from ``config``'s."""
    ours, _ = litgpt_config(config)
    differ = [f"{k}: {fields[k]!r} (file) vs {ours[k]!r} (model)" for k in ARCHITECTURE
              if k in fields and k in ours and fields[k] is not None and fields[k] != ours[k]]
    vocab = {fields.get("vocab_size"), fields.get("padded_vocab_size")} - {None}
    if vocab and config.vocab_size not in vocab:
        differ.append(f"vocab_size: {sorted(vocab)} (file) vs {config.vocab_size} (model)")
    if differ:
        raise AdapterError(f"{path}: the adapter was trained on a different architecture ({'; '.join(differ)}); "
                           f"{PYTHON_HINT}")


def _settings(state: dict[str, torch.Tensor], fields: dict[str, Any], path: Path, n_layer: int) -> tuple[int, int]:
    """(prompt_length, start_layer) from the prefix tensors, checked against the YAML when it has them."""
    prefixes = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"transformer\.h\.(\d+)\.attn\.adapter_wte\.weight", key)
        if m:
            prefixes[int(m[1])] = tensor.shape[0]
    if not prefixes:
        raise AdapterError(f"{path}: no transformer.h.N.attn.adapter_wte.weight: not a LitGPT adapter")
    start, lengths = min(prefixes), set(prefixes.values())
    if len(lengths) != 1 or sorted(prefixes) != list(range(start, n_layer)):
        raise AdapterError(f"{path}: prefixes on layers {sorted(prefixes)} with lengths {sorted(lengths)}; expected "
                           f"one length on every layer from the first adapted one to the last ({n_layer - 1})")
    length = lengths.pop()
    for key, value in (("adapter_prompt_length", length), ("adapter_start_layer", start)):
        if fields.get(key) is not None and fields[key] != value:
            raise AdapterError(f"{path.parent / CONFIG_YAML}: {key}={fields[key]} but the weights say {value}")
    return length, start


def _copy_in(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    targets: dict[str, list[tuple[str, int | None]]] = {}
    for ours in adapter_state(model):
        name, index = litgpt_name(ours, model)
        targets.setdefault(name, []).append((ours, index))
    unknown = sorted(set(state) - set(targets))
    missing = sorted(set(targets) - set(state))
    if unknown or missing:
        raise AdapterError(f"{path}: does not fit this model's adapter: "
                           + "; ".join(part for part in (f"unexpected {unknown[:6]}" if unknown else "",
                                                         f"missing {missing[:6]}" if missing else "") if part))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, members in targets.items():
            tensor = state[name]
            if any(index is not None for _, index in members):
                pieces = dict(zip((0, 1, 2), tensor.split(_qkv_sizes(model.config))))
                tensor_of = {ours: pieces[index] for ours, index in members}
            else:
                tensor_of = {members[0][0]: tensor}
            for ours, t in tensor_of.items():
                _copy(params[ours], t, name, path)


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str, path: Path) -> None:
    if name == "lm_head.adapter_bias" or name == "lm_head.adapter_scale":
        tensor = tensor[: param.shape[0]]  # LitGPT pads the vocabulary; the padding's entries are never used
    if tensor.shape != param.shape:
        raise AdapterError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
    param.copy_(tensor)


__all__ = ["CONFIG_YAML", "WEIGHTS", "check_litgpt_base", "find_litgpt_adapter", "litgpt_config", "litgpt_name",
           "litgpt_state", "load_litgpt_adapter", "read_litgpt_adapter", "save_litgpt_adapter"]

"""LoRA adapters through ``peft``, saved and loaded in PEFT's own format with Hugging Face names.

``peft`` injects its ``lora.Linear`` layers into our model (``inject_adapter_in_model``): the
adapter maths is peft's, not a copy. What lives here is the translation between our module names
and the checkpoint's, so that an adapter trained here loads onto the ``transformers`` model with
``PeftModel.from_pretrained`` and gives the same logits, and an adapter trained there loads here.

Fused HF matrices (GPT-2 ``c_attn``, NeoX ``query_key_value``, Phi-3 ``qkv_proj``/``gate_up_proj``)
are several modules here. Loading splits the fused ``lora_B`` by rows and shares ``lora_A``, which
is exact. Saving stacks the members' ``lora_A`` and places their ``lora_B`` block-diagonally: an
exact LoRA of rank Σr, written with peft's ``rank_pattern``/``alpha_pattern``.

A LoRA layer is linear in its input, so the LRP rules need nothing new: relevance flows through
``W x + s·B A x`` as through any linear layer (gradient × input).

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama"))
>>> attach_lora(model, r=4, alpha=8)
>>> sorted(lora_layers(model))[:2]
['layers.0.attn.k_proj', 'layers.0.attn.o_proj']
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.layouts import hf_module_of, is_transposed, our_modules_of
from ..errors import AdapterError, TrainError
from ..fileio import atomic_path, atomic_write, read_json
from ..model.quant import Int8Linear
from .base_check import PYTHON_HINT, check_fingerprint, write_fingerprint

_LINEAR = (nn.Linear, Int8Linear)  # what LoRA can wrap

#: our module names LoRA targets by default: every linear layer of attention and MLP (not lm_head,
#: not a router); MLA's low-rank factors (DeepSeek) and JetMoE's shared key/value projection too
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "kv_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."  # what PeftModel puts before the HF module names


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise TrainError("LoRA needs the 'peft' package: pip install 'lucidlm[train]'") from exc
    return peft


# ----------------------------------------------------------------------------- attach / inspect
def attach_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                targets: tuple[str, ...] | list[str] | None = None, *, rank_pattern: dict | None = None,
                alpha_pattern: dict | None = None, use_rslora: bool = False) -> None:
    """Inject peft LoRA layers (frozen base, trainable A/B) into ``model`` in place.

    ``targets``: our module leaf names (``q_proj``, ``up_proj`` ...) or full names.
    """
    peft = _peft()
    if r < 1:
        raise TrainError(f"lora_r={r}: expected a positive rank")
    targets = list(targets or default_targets(model))
    if not targets:
        raise TrainError(f"lora_targets: this model has no linear layer named {', '.join(DEFAULT_TARGETS)} outside "
                         "its MoE experts; name the modules to adapt (lora_targets=...)")
    _check_wrappable(model, targets)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                             use_rslora=use_rslora, bias="none")
    if any(isinstance(m, Int8Linear) for m in model.modules()):  # QLoRA-style: peft's LoRA over int8
        config._register_custom_module({Int8Linear: peft.tuners.lora.Linear})
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError as exc:
        raise TrainError(f"lora targets {targets}: {exc}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def _check_wrappable(model: nn.Module, targets: list[str]) -> None:
    """A :class:`TrainError` naming a target that is not a linear layer: stacked expert weights
    (gpt-oss ``gate_up``/``down``, DBRX ``experts``, JetMoE ``input_linear``/``output_linear``) are
    parameters, which peft's LoRA cannot wrap."""
    for name, module in model.named_modules():
        target = next((t for t in targets if name == t or name.endswith("." + t)), None)
        wrapped = hasattr(module, "base_layer") or ".lora_" in name  # peft's own layers: its business
        if target is not None and not isinstance(module, _LINEAR) and not wrapped:
            raise TrainError(f"lora_targets: {target!r} names {name}, a {type(module).__name__} (stacked weights, "
                             "not a linear layer), which LoRA cannot wrap; adapt the attention's projections "
                             "(the default) instead")


_EXPERTS_UNSAVABLE = ("{name}: LoRA on mixture-of-experts experts cannot be saved in PEFT's format (transformers "
                      "stores the experts as fused parameters); train with lora_targets=('q_proj', 'k_proj', "
                      "'v_proj', 'o_proj'), or merge instead")


def check_savable_targets(model: nn.Module, targets: tuple[str, ...] | list[str] | None) -> None:
    """Before a run that saves its adapter: the :class:`AdapterError` :func:`save_adapter` would raise
    at its end, when ``targets`` (``None``: the defaults) reach an MoE expert.

    >>> from lucidlm import Config, GPT
    >>> check_savable_targets(GPT(Config.from_name("tiny-llama")), ["q_proj"])  # nothing to refuse
    """
    targets = list(targets or default_targets(model))
    for name, module in model.named_modules():
        if ".experts." in name and isinstance(module, _LINEAR) and any(
                name == t or name.endswith("." + t) for t in targets):
            raise AdapterError(_EXPERTS_UNSAVABLE.format(name=name))


def default_targets(model: nn.Module) -> list[str]:
    """The full names of the linear layers with a :data:`DEFAULT_TARGETS` leaf name, in the attention
    only where the model has MoE layers. transformers 5 stores experts as fused parameters, and peft
    (0.21) converts every ``gate_proj``/``up_proj``/``down_proj`` target of such a model onto them,
    those of its dense layers and shared experts too (DeepSeek's first layers, Qwen3-MoE's
    ``mlp_only_layers``), so an adapter on any MLP of an MoE model would not load there as trained.

    >>> from lucidlm import Config, GPT
    >>> default_targets(GPT(Config.from_name("tiny-llama")))[:2]
    ['layers.0.attn.q_proj', 'layers.0.attn.k_proj']
    """
    routed = getattr(model.config, "n_expert", 0) > 0
    return [name for name, m in model.named_modules()
            if isinstance(m, _LINEAR) and name.rsplit(".", 1)[-1] in DEFAULT_TARGETS
            and ".experts." not in name and not (routed and ".mlp." in name)]


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Our module name -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    try:
        return bool(lora_layers(model))
    except ImportError:
        return False


def _parts(layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scaling) of a layer's one adapter."""
    (adapter,) = layer.lora_A.keys()
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += s·B A) and remove the LoRA layers."""
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        if isinstance(base, Int8Linear):  # int8 weights cannot absorb the update: merge in float
            (adapter,) = layer.lora_A.keys()
            merged = base.to_linear()
            with torch.no_grad():
                merged.weight += layer.get_delta_weight(adapter).to(merged.weight.dtype)
            base = merged
        else:
            layer.merge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, base)
    return model


# ----------------------------------------------------------------------------- save (ours -> PEFT)
def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as ``peft`` does, with the
    checkpoint's module names, and the base weights' fingerprint (``lucidlm_base.json``, see
    :mod:`lucidlm.train.base_check`). ``base_model``: the base's hub id, or a name (never a local
    path: the adapter travels). Each file is written atomically."""
    from safetensors.torch import save_file

    config = model.config
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    tensors, ranks, alphas, dropout, rslora = {}, {}, {}, 0.0, False
    fused: dict[str, list] = {}
    for ours, layer in layers.items():
        if ".experts." in ours:
            raise AdapterError(_EXPERTS_UNSAVABLE.format(name=ours))
        hf, spec, index = hf_module_of(ours, config)
        A, B, scaling = _parts(layer)
        rslora = _flag(layer.use_rslora)
        dropout = _dropout_p(layer)
        if spec is None:
            tensors[hf], ranks[hf] = (A, B), A.shape[0]
            alphas[hf] = _alpha_for(scaling, A.shape[0], rslora)
        else:
            fused.setdefault(hf, [spec, {}])[1][index] = (ours, A, B, scaling)
    for hf, (spec, members) in fused.items():
        A, B, rank, scaling = _fuse_members(model, hf, spec, members)
        tensors[hf], ranks[hf], alphas[hf] = (A, B), rank, _alpha_for(scaling, rank, rslora)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[h] for h in ranks if ranks[h] == r).most_common(1)[0][0]
    targets, rank_pattern, alpha_pattern = _collapse(model, ranks, alphas, r, alpha)
    peft_config = _peft().LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, use_rslora=rslora, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        fan_in_fan_out=any(is_transposed(h, config) for h in ranks))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for hf, (A, B) in tensors.items():
        state[f"{_PREFIX}{hf}.lora_A.weight"] = A.detach().cpu().contiguous()
        state[f"{_PREFIX}{hf}.lora_B.weight"] = B.detach().cpu().contiguous()
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write(directory / CONFIG_FILE, json.dumps(peft_config.to_dict(), indent=2, default=list))
    write_fingerprint(model, directory, base_model)
    return directory


def _flag(value) -> bool:
    """peft keeps some per-adapter settings as ``{adapter: value}``."""
    return bool(next(iter(value.values()), False)) if isinstance(value, dict) else bool(value)


def _dropout_p(layer) -> float:
    (drop,) = layer.lora_dropout.values()
    return float(getattr(drop, "p", 0.0))


def _alpha_for(scaling: float, rank: int, rslora: bool) -> float:
    """The lora_alpha giving ``scaling`` at ``rank`` (alpha / r, or alpha / sqrt(r) for rsLoRA)."""
    value = scaling * (math.sqrt(rank) if rslora else rank)
    return int(round(value)) if abs(value - round(value)) < 1e-6 else value


def _fuse_members(model: nn.Module, hf: str, spec, members: dict[int, tuple]) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One exact LoRA for a fused HF matrix: A stacked, B block-diagonal (zero rows for members
    without an adapter), every member rescaled to the first member's scaling."""
    first = min(members)
    scaling = members[first][3]
    rank = sum(m[1].shape[0] for m in members.values())
    A = torch.cat([members[i][1] for i in sorted(members)], dim=0)
    names, _ = our_modules_of(hf, model.config)  # every member, in the fused matrix's order
    blocks, column = [], 0
    for index, name in enumerate(names):
        if index in members:
            _, a, b, s = members[index]
            block = b.new_zeros(b.shape[0], rank)
            block[:, column: column + a.shape[0]] = b * (s / scaling)
            column += a.shape[0]
        else:  # a member without an adapter: its rows of the fused B stay zero
            block = A.new_zeros(model.get_submodule(name).out_features, rank)
        blocks.append(block)
    return A, spec.fuse(blocks, model.config), rank, scaling


def _collapse(model: nn.Module, ranks: dict, alphas: dict, r: int, alpha: float):
    """Leaf names (``q_proj``) when a kind of module is adapted in every layer with the same rank,
    else full module names; ranks/alphas that differ from the default go into the patterns."""
    config = model.config
    all_hf = set()
    for name, m in model.named_modules():
        name = name.removesuffix(".base_layer")  # a LoRA layer's own Linear
        if isinstance(m, _LINEAR) and name != "lm_head" and ".lora_" not in name:
            try:
                all_hf.add(hf_module_of(name, config)[0])
            except KeyError:
                continue
    by_leaf: dict[str, list[str]] = {}
    for hf in ranks:
        by_leaf.setdefault(hf.rsplit(".", 1)[-1], []).append(hf)
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for leaf, names in sorted(by_leaf.items()):
        every = {h for h in all_hf if h.rsplit(".", 1)[-1] == leaf} == set(names)
        uniform = len({(ranks[h], alphas[h]) for h in names}) == 1
        targets.extend([leaf] if every else sorted(names))
        entries = [(leaf, names[0])] if every and uniform else [(re.escape(h), h) for h in sorted(names)]
        for key, h in entries:
            if ranks[h] != r:
                rank_pattern[key] = ranks[h]
            if alphas[h] != alpha:
                alpha_pattern[key] = alphas[h]
    return targets, rank_pattern, alpha_pattern


# ----------------------------------------------------------------------------- load (PEFT -> ours)
def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors); AdapterError naming the file when either is bad."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    config = read_json(config_path, AdapterError, "a PEFT LoRA adapter directory")
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}: "
                           "only LoRA adapters are supported")
    unsupported = {"use_dora": bool(config.get("use_dora")), "modules_to_save": bool(config.get("modules_to_save")),
                   "bias": config.get("bias") not in (None, "none")}
    for key, present in unsupported.items():
        if present:
            raise AdapterError(f"{config_path}: {key}={config[key]!r} is not supported (plain LoRA only)")
    if not weights_path.is_file():
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights_path}: cannot read adapter weights ({exc})") from None
    return config, tensors


def load_adapter(model: nn.Module, directory: str | Path, base_names: list[str] | None = None) -> dict[str, Any]:
    """Attach the adapter in ``directory`` (ours or one trained with ``peft``) to ``model``.

    ``base_names``: names this model is known by; an adapter recording a different
    ``base_model_name_or_path`` is refused. Returns the adapter config."""
    from peft.utils.other import get_pattern_key

    config, tensors = read_adapter(directory)
    _check_base(config, base_names, Path(directory), model)
    pairs = _pair_tensors(tensors, Path(directory) / WEIGHTS_FILE)
    ours_r, ours_alpha, weights = {}, {}, {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for hf, (A, B) in pairs.items():
        try:
            names, spec = our_modules_of(hf, model.config)
        except KeyError:
            raise AdapterError(f"{directory}: adapter targets module {hf!r}, which a "
                               f"{model.config.family!r} model does not have") from None
        rank = A.shape[0]
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), hf), config.get("lora_alpha", 8))
        parts = spec.split(B, model.config) if spec is not None else [B]
        for name, b in zip(names, parts):
            base = _linear(model, name, directory)
            if A.shape[1] != base.in_features or b.shape[0] != base.out_features or b.shape[1] != rank:
                raise AdapterError(f"{directory}: adapter for {hf} has lora_A {tuple(A.shape)} and lora_B "
                                   f"{tuple(B.shape)}, which do not fit the base layer "
                                   f"({base.out_features} x {base.in_features})")
            ours_r[name], ours_alpha[name], weights[name] = rank, alpha, (A, b)
    attach_lora(model, r=int(config.get("r", 8)), alpha=config.get("lora_alpha", 8),
                dropout=float(config.get("lora_dropout", 0.0)), targets=list(weights),
                rank_pattern={re.escape(n): v for n, v in ours_r.items()},
                alpha_pattern={re.escape(n): v for n, v in ours_alpha.items()},
                use_rslora=bool(config.get("use_rslora", False)))
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (A, b) in weights.items():
            a_param, b_param, _ = _parts(layers[name])
            a_param.copy_(A)
            b_param.copy_(b)
    return config


def _linear(model: nn.Module, name: str, directory) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"{directory}: adapter targets {name}, which this model does not have "
                           f"({model.config.n_layer} layers)") from None
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _pair_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (plain LoRA adapters hold only "
                               "lora_A/lora_B weights)")
        halves.setdefault(m[1], {})[m[2]] = t.float() if t.dtype not in (torch.float32, torch.float64) else t
    if not halves:
        raise AdapterError(f"{path}: the adapter holds no tensors")
    for hf, h in halves.items():
        if set(h) != {"A", "B"}:
            raise AdapterError(f"{path}: module {hf} has lora_{'A' if 'A' in h else 'B'} but not its partner")
    return {hf: (h["A"], h["B"]) for hf, h in halves.items()}


def base_identity(name: str | None) -> str:
    """A checkpoint's name without folders and file suffixes, lowercased:
    ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` and ``".../SmolLM2-135M-Instruct.Q4_1.gguf"`` agree."""
    return Path(str(name).rstrip("/")).name.split(".")[0].lower() if name else ""


def _check_base(config: dict, base_names: list[str] | None, directory: Path, model: nn.Module) -> None:
    """Refuse an adapter trained on another model (``base_names`` None: no check). A recorded hub
    id that names this model settles it at once; else the weights' fingerprint stored beside the
    adapter decides (a folder name is too weak: every run's folder may be called ``model``); an
    adapter without one (``peft``'s) falls back to names."""
    if base_names is None:
        return
    from ..checkpoints.hub import is_repo_id

    recorded = config.get("base_model_name_or_path")
    names = [n for n in base_names if n]
    same_name = bool(recorded and names and base_identity(str(recorded)) in {base_identity(n) for n in names})
    if same_name and is_repo_id(str(recorded)):
        return
    if check_fingerprint(model, directory, recorded) is not None:
        return
    if same_name or not recorded or not names or _same_base(str(recorded), names, model.config):
        return
    raise AdapterError(f"{directory}: adapter was trained on base_model_name_or_path={recorded!r}, "
                       f"not on this model ({', '.join(sorted(names))}); {PYTHON_HINT}")


_SHAPE_FIELDS = ("family", "vocab_size", "n_embd", "n_layer", "n_head", "n_query_groups", "head_size",
                 "intermediate_size")


def _same_base(recorded: str, names: list[str], model_config) -> bool:
    """Whether ``recorded`` (an adapter without a fingerprint) names this model: the same local
    file, or a local checkpoint directory of the same architecture and size (a copy or conversion
    of it; adapters written before fingerprints recorded local paths)."""
    path = Path(recorded)
    if not path.exists():
        return False
    ours = {Path(n).resolve() for n in names if Path(n).exists()}
    if path.resolve() in ours or any(p.resolve() in ours for p in path.glob("*.gguf")):
        return True
    if (path / "config.json").is_file():
        from ..config import Config

        try:
            theirs = Config.from_hf(path)
        except Exception:  # an unreadable config cannot vouch for the adapter
            return False
        return all(getattr(theirs, f) == getattr(model_config, f) for f in _SHAPE_FIELDS)
    return False

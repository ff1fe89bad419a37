"""How each family names its tensors in a Hugging Face checkpoint, mapped onto our module names.

A layout is a list of name templates (``{i}`` a layer, ``{e}`` an expert) matched as prefixes, plus
fused tensors that one side stores as one matrix and we store as several (GPT-2 ``c_attn``,
NeoX and Falcon ``query_key_value``, Phi-3 ``qkv_proj``/``gate_up_proj``), tensors that stack every
expert of a layer (GraniteMoE ``input_linear``/``output_linear``) and GPT-2's transposed Conv1D weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

from ..config import Config
from ..registry import Registry


@dataclasses.dataclass(frozen=True)
class Fused:
    """One HF tensor <-> several of ours (split along dim 0, in a layout the functions define)."""

    hf: str
    ours: tuple[str, ...]
    split: Callable[[torch.Tensor, Config], list[torch.Tensor]]
    fuse: Callable[[list[torch.Tensor], Config], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Stacked:
    """One HF tensor (experts, rows, columns) holding every expert of a layer <-> per-expert tensors of
    ours: expert ``e``'s rows split evenly into ``ours`` (templates with ``{i}`` and ``{e}``), in
    order. GraniteMoE's ``input_linear`` is (experts, 2 * size, n_embd), gate rows then up rows."""

    hf: str
    ours: tuple[str, ...]

    def split(self, tensor: torch.Tensor, groups: dict[str, str]) -> dict[str, torch.Tensor]:
        return {template.format(e=e, **groups): part.contiguous()
                for e, expert in enumerate(tensor) for template, part in zip(self.ours, expert.chunk(len(self.ours)))}

    def stack(self, state: dict[str, torch.Tensor], groups: dict[str, str], n_expert: int) -> torch.Tensor:
        return torch.stack([torch.cat([state[t.format(**{**groups, "e": e})] for t in self.ours])
                            for e in range(n_expert)])


@dataclasses.dataclass(frozen=True)
class Layout:
    renames: tuple[tuple[str, str], ...]  # (hf prefix template, our prefix template)
    fused: tuple[Fused, ...] = ()
    transposed: tuple[str, ...] = ()  # regexes of HF weights stored as (in, out) (GPT-2 Conv1D)
    stacked: tuple[Stacked, ...] = ()  # HF tensors holding every expert of a layer
    ignore: tuple[str, ...] = ()  # regexes of HF buffers that are not weights
    # the base model's prefix: checkpoints saved from the bare model (e.g. the original "gpt2")
    # omit it, and transformers adds it back; so do we
    prefix: str = "model."


def _qkv_sizes(c: Config) -> list[int]:
    return [c.n_head * c.head_size, c.n_query_groups * c.head_size, c.n_query_groups * c.head_size]


def _split_qkv(t: torch.Tensor, c: Config) -> list[torch.Tensor]:
    return list(t.split(_qkv_sizes(c), dim=0))


def _split_halves(t: torch.Tensor, c: Config) -> list[torch.Tensor]:
    return list(t.chunk(2, dim=0))


def _cat(parts: list[torch.Tensor], c: Config) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def _split_neox(t: torch.Tensor, c: Config) -> list[torch.Tensor]:
    """NeoX interleaves per head: rows are [head][q|k|v][head_size]."""
    per_head = t.reshape(c.n_head, 3, c.head_size, *t.shape[1:])
    return [per_head[:, j].reshape(c.n_head * c.head_size, *t.shape[1:]) for j in range(3)]


def _fuse_neox(parts: list[torch.Tensor], c: Config) -> torch.Tensor:
    stacked = torch.stack([p.reshape(c.n_head, c.head_size, *p.shape[1:]) for p in parts], dim=1)
    return stacked.reshape(3 * c.n_head * c.head_size, *parts[0].shape[1:])


def _split_falcon(t: torch.Tensor, c: Config) -> list[torch.Tensor]:
    """Falcon's query_key_value, per KV group: the group's query heads, then its key and its value
    head (rows [group][q_1..q_r|k|v][head_size]). One group is the multi-query layout (all query
    heads, k, v); a group per head is NeoX's [head][q|k|v]."""
    g, r, rest = c.n_query_groups, c.n_head // c.n_query_groups, t.shape[1:]
    grouped = t.reshape(g, r + 2, c.head_size, *rest)
    return [grouped[:, :r].reshape(g * r * c.head_size, *rest),
            grouped[:, r].reshape(g * c.head_size, *rest), grouped[:, r + 1].reshape(g * c.head_size, *rest)]


def _fuse_falcon(parts: list[torch.Tensor], c: Config) -> torch.Tensor:
    g, r, rest = c.n_query_groups, c.n_head // c.n_query_groups, parts[0].shape[1:]
    q, k, v = (p.reshape(g, -1, c.head_size, *rest) for p in parts)
    return torch.cat([q, k, v], dim=1).reshape((r + 2) * g * c.head_size, *rest)


def _fused_pair(hf: str, ours: tuple[str, ...], split, fuse) -> tuple[Fused, ...]:
    return tuple(Fused(f"{hf}.{s}", tuple(f"{o}.{s}" for o in ours), split, fuse) for s in ("weight", "bias"))


_LAYER = "model.layers.{i}."
_LLAMA_BODY = ((_LAYER + "self_attn.", "layers.{i}.attn."), (_LAYER + "mlp.", "layers.{i}.mlp."))
_TOP = (("model.embed_tokens.", "embed."), ("model.norm.", "final_norm."), ("lm_head.", "lm_head."))
_QKV = ("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj")



def _falcon_layout(attn_norm: str, mlp_norm: str) -> Layout:
    h = "transformer.h.{i}."
    return Layout((("transformer.word_embeddings.", "embed."), ("transformer.ln_f.", "final_norm."),
                   ("lm_head.", "lm_head."),
                   (h + attn_norm + ".", "layers.{i}.attn_norm."), (h + mlp_norm + ".", "layers.{i}.mlp_norm."),
                   (h + "self_attention.dense.", "layers.{i}.attn.o_proj."),
                   (h + "mlp.dense_h_to_4h.", "layers.{i}.mlp.up_proj."),
                   (h + "mlp.dense_4h_to_h.", "layers.{i}.mlp.down_proj.")),
                  fused=_fused_pair(h + "self_attention.query_key_value", _QKV, _split_falcon, _fuse_falcon),
                  prefix="transformer.")


def _glm_layout(*post_norms: tuple[str, str]) -> Layout:
    return Layout(_TOP + _LLAMA_BODY + post_norms + (
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm.")),
        fused=_fused_pair(_LAYER + "mlp.gate_up_proj", ("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"),
                          _split_halves, _cat))


#: layout name (a :class:`~lucidlm.families.Family`'s ``layout``, a Config's ``family``) -> its
#: :class:`Layout`; :func:`register_layout` adds one
LAYOUTS: Registry[Layout] = Registry("layout", {
    "llama": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."))),
    "mixtral": Layout(_TOP + (
        (_LAYER + "self_attn.", "layers.{i}.attn."),
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."),
        (_LAYER + "block_sparse_moe.gate.", "layers.{i}.mlp.router."),
        (_LAYER + "block_sparse_moe.experts.{e}.w1.", "layers.{i}.mlp.experts.{e}.gate_proj."),
        (_LAYER + "block_sparse_moe.experts.{e}.w3.", "layers.{i}.mlp.experts.{e}.up_proj."),
        (_LAYER + "block_sparse_moe.experts.{e}.w2.", "layers.{i}.mlp.experts.{e}.down_proj."))),
    "gemma": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.post_attn_norm."),
        (_LAYER + "pre_feedforward_layernorm.", "layers.{i}.mlp_norm."),
        (_LAYER + "post_feedforward_layernorm.", "layers.{i}.post_mlp_norm."))),
    "stablelm": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."),
        (_LAYER + "self_attn.q_layernorm.norms.{e}.", "layers.{i}.attn.q_norm.norms.{e}."),
        (_LAYER + "self_attn.k_layernorm.norms.{e}.", "layers.{i}.attn.k_norm.norms.{e}."))),
    "olmo2": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "post_attention_layernorm.", "layers.{i}.post_attn_norm."),
        (_LAYER + "post_feedforward_layernorm.", "layers.{i}.post_mlp_norm."))),
    "apertus": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "attention_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "feedforward_layernorm.", "layers.{i}.mlp_norm."))),
    # GLM / GLM-4: transformers' fused gate_up_proj is [gate; up], as Phi-3's; GLM-4 adds sandwich norms
    "glm": _glm_layout(),
    "glm4": _glm_layout((_LAYER + "post_self_attn_layernorm.", "layers.{i}.post_attn_norm."),
                        (_LAYER + "post_mlp_layernorm.", "layers.{i}.post_mlp_norm.")),
    "starcoder2": Layout(_TOP + (
        (_LAYER + "self_attn.", "layers.{i}.attn."),
        (_LAYER + "mlp.c_fc.", "layers.{i}.mlp.up_proj."),
        (_LAYER + "mlp.c_proj.", "layers.{i}.mlp.down_proj."),
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."))),
    "persimmon": Layout((("model.embed_tokens.", "embed."), ("model.final_layernorm.", "final_norm."),
                         ("lm_head.", "lm_head."),
                         (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
                         (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."),
                         (_LAYER + "self_attn.dense.", "layers.{i}.attn.o_proj."),
                         (_LAYER + "self_attn.q_layernorm.", "layers.{i}.attn.q_norm."),
                         (_LAYER + "self_attn.k_layernorm.", "layers.{i}.attn.k_norm."),
                         (_LAYER + "mlp.dense_h_to_4h.", "layers.{i}.mlp.up_proj."),
                         (_LAYER + "mlp.dense_4h_to_h.", "layers.{i}.mlp.down_proj.")),
                        fused=_fused_pair(_LAYER + "self_attn.query_key_value", _QKV, _split_neox, _fuse_neox)),
    "phi": Layout((("model.embed_tokens.", "embed."), ("model.final_layernorm.", "final_norm."),
                   ("lm_head.", "lm_head."),
                   (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
                   (_LAYER + "self_attn.dense.", "layers.{i}.attn.o_proj."),
                   (_LAYER + "self_attn.", "layers.{i}.attn."),
                   (_LAYER + "mlp.fc1.", "layers.{i}.mlp.up_proj."),
                   (_LAYER + "mlp.fc2.", "layers.{i}.mlp.down_proj."))),
    "phi3": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm.")),
        fused=_fused_pair(_LAYER + "self_attn.qkv_proj", _QKV, _split_qkv, _cat)
        + _fused_pair(_LAYER + "mlp.gate_up_proj", ("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"),
                      _split_halves, _cat)),
    "gpt2": Layout((("transformer.wte.", "embed."), ("transformer.wpe.", "pos_embed."),
                    ("transformer.ln_f.", "final_norm."), ("lm_head.", "lm_head."),
                    ("transformer.h.{i}.ln_1.", "layers.{i}.attn_norm."),
                    ("transformer.h.{i}.ln_2.", "layers.{i}.mlp_norm."),
                    ("transformer.h.{i}.attn.c_proj.", "layers.{i}.attn.o_proj."),
                    ("transformer.h.{i}.mlp.c_fc.", "layers.{i}.mlp.up_proj."),
                    ("transformer.h.{i}.mlp.c_proj.", "layers.{i}.mlp.down_proj.")),
                   fused=_fused_pair("transformer.h.{i}.attn.c_attn", _QKV, _split_qkv, _cat),
                   transposed=(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight",),
                   ignore=(r".*\.attn\.(masked_)?bias$",), prefix="transformer."),
    # DeepSeek-V2/V3 (lucidlm.model.mla): attention and MoE modules carry transformers' own names
    "deepseek": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."))),
    "qwen_moe": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."),
        (_LAYER + "mlp.gate.", "layers.{i}.mlp.router."))),  # experts, shared_expert(_gate): same names
    "gptj": Layout((("transformer.wte.", "embed."), ("transformer.ln_f.", "final_norm."), ("lm_head.", "lm_head."),
                    ("transformer.h.{i}.ln_1.", "layers.{i}.attn_norm."),
                    ("transformer.h.{i}.attn.out_proj.", "layers.{i}.attn.o_proj."),
                    ("transformer.h.{i}.attn.", "layers.{i}.attn."),
                    ("transformer.h.{i}.mlp.fc_in.", "layers.{i}.mlp.up_proj."),
                    ("transformer.h.{i}.mlp.fc_out.", "layers.{i}.mlp.down_proj.")),
                   ignore=(r".*\.attn\.(masked_)?bias$", r".*embed_positions$"), prefix="transformer."),
    "gpt_neox": Layout((("gpt_neox.embed_in.", "embed."), ("gpt_neox.final_layer_norm.", "final_norm."),
                        ("embed_out.", "lm_head."), ("lm_head.", "lm_head."),
                        ("gpt_neox.layers.{i}.input_layernorm.", "layers.{i}.attn_norm."),
                        ("gpt_neox.layers.{i}.post_attention_layernorm.", "layers.{i}.mlp_norm."),
                        ("gpt_neox.layers.{i}.attention.dense.", "layers.{i}.attn.o_proj."),
                        ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.", "layers.{i}.mlp.up_proj."),
                        ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.", "layers.{i}.mlp.down_proj.")),
                       fused=_fused_pair("gpt_neox.layers.{i}.attention.query_key_value", _QKV, _split_neox, _fuse_neox),
                       ignore=(r".*\.attention\.(masked_)?bias$", r".*rotary_emb\.inv_freq$"), prefix="gpt_neox."),
    # gpt-oss: the experts' stacked (experts, in, out) matrices and their biases, one tensor each
    "gpt_oss": Layout(_TOP + _LLAMA_BODY + (
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."),
        (_LAYER + "mlp.experts.gate_up_proj_bias", "layers.{i}.mlp.experts.gate_up.bias"),
        (_LAYER + "mlp.experts.gate_up_proj", "layers.{i}.mlp.experts.gate_up.weight"),
        (_LAYER + "mlp.experts.down_proj_bias", "layers.{i}.mlp.experts.down.bias"),
        (_LAYER + "mlp.experts.down_proj", "layers.{i}.mlp.experts.down.weight"))),
    # DBRX: a fused Wqkv; the experts' w1/v1/w2 stacked (experts * ffn, d_model), kept as they are
    "dbrx": Layout((("transformer.wte.", "embed."), ("transformer.norm_f.", "final_norm."), ("lm_head.", "lm_head."),
                    ("transformer.blocks.{i}.norm_attn_norm.norm_1.", "layers.{i}.attn_norm."),
                    ("transformer.blocks.{i}.norm_attn_norm.norm_2.", "layers.{i}.mlp_norm."),
                    ("transformer.blocks.{i}.norm_attn_norm.attn.out_proj.", "layers.{i}.attn.o_proj."),
                    ("transformer.blocks.{i}.ffn.experts.mlp.", "layers.{i}.mlp.experts."),
                    ("transformer.blocks.{i}.ffn.router.", "layers.{i}.mlp.router.")),
                   fused=_fused_pair("transformer.blocks.{i}.norm_attn_norm.attn.Wqkv", _QKV, _split_qkv, _cat),
                   prefix="transformer."),
    # JetMoE (lucidlm.model.moa): the attention and MoE experts carry transformers' own names
    "jetmoe": Layout(_TOP + ((_LAYER + "self_attention.", "layers.{i}.attn."), (_LAYER + "mlp.", "layers.{i}.mlp."),
                             (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
                             (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."))),
    "falcon": _falcon_layout("input_layernorm", "post_attention_layernorm"),  # shared norm, or sequential
    "falcon_new": _falcon_layout("ln_attn", "ln_mlp"),  # new_decoder_architecture: two parallel norms
    # GraniteMoE: each layer's experts in two stacked tensors, the router under router.layer
    "granitemoe": Layout(_TOP + (
        (_LAYER + "self_attn.", "layers.{i}.attn."),
        (_LAYER + "input_layernorm.", "layers.{i}.attn_norm."),
        (_LAYER + "post_attention_layernorm.", "layers.{i}.mlp_norm."),
        (_LAYER + "block_sparse_moe.router.layer.", "layers.{i}.mlp.router.")),
        stacked=(Stacked(_LAYER + "block_sparse_moe.input_linear.weight",
                         ("layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers.{i}.mlp.experts.{e}.up_proj.weight")),
                 Stacked(_LAYER + "block_sparse_moe.output_linear.weight",
                         ("layers.{i}.mlp.experts.{e}.down_proj.weight",)))),
})


def register_layout(name: str, layout: Layout) -> Layout:
    """Add the weight-name layout ``name`` (a :class:`~lucidlm.families.Family` refers to it)."""
    if not isinstance(layout, Layout):
        raise TypeError(f"register_layout: expected a Layout, got {type(layout).__name__}")
    LAYOUTS[name] = layout
    return layout


#: buffers older checkpoints saved (transformers < 4.31 made RoPE's inv_freq non-persistent); loaders skip them
_ALWAYS_IGNORED = (r".*\.rotary_emb\.inv_freq$",)


def _regex(template: str, prefix: bool) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + pattern + ("(?P<rest>.*)$" if prefix else "$"))


def _rename(name: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        m = _regex(src, prefix=True).match(name)
        if m:
            return dst.format(**{k: v for k, v in m.groupdict().items() if k != "rest"}) + m["rest"]
    return None


def hf_to_ours(state: dict[str, torch.Tensor], config: Config) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename/split an HF state dict into ours. Returns (our tensors, HF names we did not recognise)."""
    layout = LAYOUTS[config.family]
    pairs = sorted(layout.renames, key=lambda p: -len(p[0]))  # most specific prefix first
    ours, unknown = {}, []
    bare = not any(name.startswith(layout.prefix) for name in state)
    for name, tensor in state.items():
        if bare and not name.startswith(("lm_head.", "embed_out.")):
            name = layout.prefix + name
        if any(re.match(rx, name) for rx in layout.ignore + _ALWAYS_IGNORED):
            continue
        if any(re.match(rx, name) for rx in layout.transposed):
            tensor = tensor.t()
        fused = _match_fused(name, layout.fused, hf_side=True)
        if fused:
            spec, groups = fused
            for our_name, part in zip(spec.ours, spec.split(tensor, config)):
                ours[our_name.format(**groups)] = part.contiguous()
            continue
        stacked = _match_stacked(name, layout.stacked, hf_side=True)
        if stacked:
            ours.update(stacked[0].split(tensor, stacked[1]))
            continue
        new = _rename(name, pairs)
        if new is None:
            unknown.append(name)
        else:
            ours[new] = tensor
    return ours, unknown


def _match_fused(name: str, fused: tuple[Fused, ...], hf_side: bool):
    for spec in fused:
        for template in ([spec.hf] if hf_side else [spec.ours[0]]):
            m = _regex(template, prefix=False).match(name)
            if m:
                return spec, m.groupdict()
    return None


def _match_stacked(name: str, stacked: tuple[Stacked, ...], hf_side: bool):
    """(spec, groups) of the :class:`Stacked` tensor ``name`` is (``hf_side``) or is a member of."""
    for spec in stacked:
        for template in ([spec.hf] if hf_side else spec.ours):
            m = _regex(template, prefix=False).match(name)
            if m:
                return spec, m.groupdict()
    return None


def ours_to_hf(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_ours` (used to save checkpoints ``transformers`` can load)."""
    layout = LAYOUTS[config.family]
    pairs = sorted(((o, h) for h, o in layout.renames), key=lambda p: -len(p[0]))
    members = {m for spec in layout.fused for m in spec.ours}
    out = {}
    for name, tensor in state.items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        stacked = _match_stacked(name, layout.stacked, hf_side=False)
        fused = _match_fused(name, layout.fused, hf_side=False)
        if stacked:
            spec, groups = stacked
            if groups["e"] != "0" or not _regex(spec.ours[0], prefix=False).match(name):
                continue  # emitted once, with expert 0's first member
            name, tensor = spec.hf.format(**groups), spec.stack(state, groups, config.n_expert)
        elif fused:
            spec, groups = fused
            parts = [state[o.format(**groups)] for o in spec.ours]
            name, tensor = spec.hf.format(**groups), spec.fuse(parts, config)
        elif any(_regex(m, prefix=False).match(name) for m in members):
            continue  # emitted with its fused tensor
        else:
            name = _rename(name, pairs)
            if name is None:
                raise KeyError(f"no Hugging Face name for a tensor in layout {config.family!r}")
        if any(re.match(rx, name) for rx in layout.transposed):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


# ----- module names (LoRA adapters address modules, not tensors) ------------------------------
def hf_module_of(ours: str, config: Config) -> tuple[str, Fused | None, int]:
    """The HF module holding our module ``ours`` (``"layers.0.attn.q_proj"``). For a member of a
    fused HF matrix (GPT-2 ``c_attn`` ...) also the fused spec and the member's index in it."""
    layout = LAYOUTS[config.family]
    name = ours + ".weight"
    for spec in layout.fused:
        for index, template in enumerate(spec.ours):
            m = _regex(template, prefix=False).match(name)
            if m:
                return spec.hf.format(**m.groupdict()).removesuffix(".weight"), spec, index
    hf = _rename(name, sorted(((o, h) for h, o in layout.renames), key=lambda p: -len(p[0])))
    if hf is None:
        raise KeyError(f"{ours}: no Hugging Face module in layout {config.family!r}")
    return hf.removesuffix(".weight"), None, -1


def our_modules_of(hf: str, config: Config) -> tuple[list[str], Fused | None]:
    """Our module(s) for the HF module ``hf``: several for a fused matrix (with its spec)."""
    layout = LAYOUTS[config.family]
    name = hf + ".weight"
    if not name.startswith((layout.prefix, "lm_head.", "embed_out.")):
        name = layout.prefix + name  # adapters trained on a bare base model
    fused = _match_fused(name, layout.fused, hf_side=True)
    if fused:
        spec, groups = fused
        return [o.format(**groups).removesuffix(".weight") for o in spec.ours], spec
    ours = _rename(name, sorted(layout.renames, key=lambda p: -len(p[0])))
    if ours is None:
        raise KeyError(f"{hf}: not a module of layout {config.family!r}")
    return [ours.removesuffix(".weight")], None


def is_transposed(hf_module: str, config: Config) -> bool:
    """Whether HF stores this module's weight as (in, out) (GPT-2 Conv1D)."""
    return any(re.match(rx, hf_module + ".weight") for rx in LAYOUTS[config.family].transposed)

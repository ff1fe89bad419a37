"""``lucidlm bench kv-bytes``: what one token costs in the KV cache of real checkpoints' configs.

No weights are needed: for each catalogue config, lucidlm's dense cache of ``--tokens`` slots is
built and measured, and ``transformers``' own cache is filled by running each attention layer of the
same config on the ``meta`` device (shapes only, no memory). The third column is what full keys and
values of the same attention would hold (every query head's key and value: what multi-head latent
attention avoids). Bytes are the keys' and values' (lucidlm's positions, 8 bytes per slot and layer,
are shown apart).

>>> print(format_row(dict(model="m", attention="MLA", lucidlm=31_104, positions=216, transformers=31_104,
...                       full_kv=276_480)))
| m | MLA | 31,104 | 216 | 31,104 | 276,480 | 8.9x |
"""

from __future__ import annotations

import json

import torch

from . import emit
from .args import add_kv_bytes as add_arguments  # noqa: F401  (lucidlm bench kv-bytes' options)

HEADER = ("| model | attention | lucidlm B/token | + positions | transformers B/token | full K/V B/token "
          "| full / cached |\n|---|---|---:|---:|---:|---:|---:|")


def run(args) -> int:
    from ..catalogue import CATALOGUE
    from ..config import Config

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CATALOGUE]
    if unknown or not names or args.tokens < 1:
        what = f"unknown catalogue names {unknown}" if unknown else "--models is empty" if not names else \
            f"--tokens {args.tokens} must be >= 1"
        print(f"lucidlm bench kv-bytes: {what}; `lucidlm models` lists the names")
        return 2
    dtype = getattr(torch, args.dtype)
    emit(f"{args.tokens} tokens, {args.dtype} cache; bytes per token summed over all layers")
    emit(HEADER)
    for name in names:
        config = Config.from_name(name)
        emit(format_row(dict(model=name, attention=attention_kind(config), **lucidlm_bytes(config, args.tokens, dtype),
                             transformers=transformers_bytes(name, args.tokens, dtype),
                             full_kv=full_kv_bytes(config, dtype))))
    return 0


def attention_kind(config) -> str:
    if config.kv_lora_rank is not None:
        return "MLA"
    return "MHA" if config.n_query_groups == config.n_head else f"GQA {config.n_head}/{config.n_query_groups}"


def lucidlm_bytes(config, tokens: int, dtype: torch.dtype) -> dict[str, int]:
    """Keys+values and positions per token of lucidlm's dense cache for ``config``."""
    from ..cache import build_cache

    cache = build_cache(config, batch=1, policy="dense", cache_tokens=tokens, dtype=dtype, device="meta")
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.k, layer.v))
    return dict(lucidlm=kv // tokens, positions=(cache.memory_bytes() - kv) // tokens)


def full_kv_bytes(config, dtype: torch.dtype) -> int:
    """Every query head's key and value in every layer: the cache of the same attention without a
    latent (MLA's key is the no-rope part plus the rotary part)."""
    key = (config.qk_nope_head_dim + config.qk_rope_head_dim) if config.kv_lora_rank is not None else config.head_size
    value = config.v_head_dim or config.head_size
    heads = config.n_head if config.kv_lora_rank is not None else config.n_query_groups
    return config.n_layer * heads * (key + value) * dtype.itemsize


def transformers_bytes(name: str, tokens: int, dtype: torch.dtype) -> int:
    """``transformers``' ``DynamicCache`` after one forward of ``tokens`` tokens through every
    attention layer of the catalogue config, on the meta device."""
    import transformers as T
    from transformers.cache_utils import DynamicCache

    from ..catalogue import CONFIGS

    published = json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))
    hf = T.AutoConfig.for_model(**{k: v for k, v in published.items() if k != "auto_map"})
    hf._attn_implementation = "eager"
    with torch.device("meta"):
        inner = T.AutoModelForCausalLM.from_config(hf, dtype=dtype).model
        h = torch.zeros(1, tokens, hf.hidden_size, dtype=dtype)
        position_embeddings = inner.rotary_emb(h, torch.arange(tokens)[None])
        cache = DynamicCache(config=hf)
        for layer in inner.layers:
            layer.self_attn(hidden_states=h, position_embeddings=position_embeddings, attention_mask=None,
                            cache=cache)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) // tokens


def format_row(row: dict) -> str:
    ratio = row["full_kv"] / row["lucidlm"]
    return (f"| {row['model']} | {row['attention']} | {row['lucidlm']:,} | {row['positions']:,} | "
            f"{row['transformers']:,} | {row['full_kv']:,} | {ratio:.1f}x |")

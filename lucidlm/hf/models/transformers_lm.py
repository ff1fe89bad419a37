"""``transformers`` 5.x model families, one table row each.

A row says which modeling module a family lives in, the prefix of its class names, and the patch
for each of its own module classes (by class-name suffix). Everything generic (``nn.LayerNorm``,
the ``transformers.activations`` classes) is covered by :data:`lucidlm.hf.registry.COMMON`.
Adding a Llama-like family is one line: ``("Mistral", "mistral", "Mistral", LLAMA_LIKE)``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .. import patches
from ..patches import PatchFactory
from ..registry import register

#: RMSNorm + gated MLP + rotary attention: Llama, Qwen2, Qwen3 (whose q_norm/k_norm are RMSNorms
#: too, so they are covered by the same row), Mistral.
LLAMA_LIKE: Mapping[str, PatchFactory] = {
    "RMSNorm": patches.rms_norm(),
    "MLP": patches.glu_mlp(),
    "Attention": patches.sdpa_attention,
}

#: (name shown to users, modeling module, class-name prefix, patches by class-name suffix, extras)
FAMILIES: list[tuple[str, str, str, Mapping[str, PatchFactory], dict]] = [
    ("Llama", "llama", "Llama", LLAMA_LIKE, {}),
    ("Qwen2", "qwen2", "Qwen2", LLAMA_LIKE, {}),
    ("Qwen3", "qwen3", "Qwen3", LLAMA_LIKE, {}),
    ("Gemma 3", "gemma3", "Gemma3",
     {"RMSNorm": patches.rms_norm(unit_offset=True),  # x·(1 + w); q_norm/k_norm and sandwich norms
      "MLP": patches.glu_mlp(),
      "Attention": patches.sdpa_attention},
     {"forward": patches.softcapped_logits("final_logit_softcapping")}),
    ("GPT-2", "gpt2", "GPT2", {"Attention": patches.sdpa_attention}, {}),  # MLP: its GELU module
    ("BERT", "bert", "Bert",
     {"SelfAttention": patches.sdpa_attention, "CrossAttention": patches.sdpa_attention}, {}),
    # extensions, to show that a new family is one row
    ("Mistral", "mistral", "Mistral", LLAMA_LIKE, {}),
    ("Phi-3", "phi3", "Phi3",
     {"RMSNorm": patches.rms_norm(), "MLP": patches.fused_glu_mlp(), "Attention": patches.sdpa_attention},
     {}),
]


def modeling_module(package: str) -> str:
    return f"transformers.models.{package}.modeling_{package}"


for name, package, prefix, table, extras in FAMILIES:
    where = modeling_module(package)
    register(f"{where}.{prefix}PreTrainedModel",
             {f"{where}.{prefix}{suffix}": factory for suffix, factory in table.items()},
             name=name, **extras)

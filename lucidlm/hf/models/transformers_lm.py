"""``transformers`` 5.x model families, one table row each.

A row names a family and where its classes live; *what* to patch is found from the modules
themselves (:mod:`lucidlm.hf.structure`: attention through ``transformers``' attention registry,
experts through its experts registry, norms, gated MLPs and activations by their structure), so
a row usually names no module class. Adding a decoder family is one row of :data:`FAMILIES`::

    Family("OLMoE", "olmoe", "Olmoe"),

and one parameter of ``tests/test_hf_families.py`` (patched relevance == native relevance). A
native family whose modules cannot be matched goes into :data:`REFUSED` with the reason instead:
explaining it is then a ``PatchError`` that says why, never an approximation.
Model-level non-linearities (Gemma's final-logit soft-capping) are patched for every row where
the config has them. Where structure is not enough a row names the family's own classes by
class-name suffix: BERT (an encoder), and DBRX and JetMoE, whose experts multiply the gated
product and the routing weights inside their own forwards (their routers' outputs are held
constant, the products get the GLU rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import patches
from ..patches import PatchFactory
from ..registry import refuse, register


@dataclass(frozen=True)
class Family:
    """One ``transformers`` family: its display name, ``transformers.models.<package>``, the prefix
    of its class names (``<prefix>PreTrainedModel`` is what gets registered) and, rarely, patches
    for its own classes by class-name suffix."""

    name: str
    package: str
    prefix: str
    modules: Mapping[str, PatchFactory] = field(default_factory=dict)


#: every causal-LM family lucidlm implements natively (lucidlm.families.table), plus BERT
FAMILIES: list[Family] = [
    Family("Llama", "llama", "Llama"),
    Family("Qwen2", "qwen2", "Qwen2"),
    Family("Qwen3", "qwen3", "Qwen3"),
    Family("Gemma 3", "gemma3", "Gemma3"),
    Family("GPT-2", "gpt2", "GPT2"),
    Family("BERT", "bert", "Bert",
           {"SelfAttention": patches.sdpa_attention, "CrossAttention": patches.sdpa_attention}),
    Family("Mistral", "mistral", "Mistral"),
    Family("Phi-3", "phi3", "Phi3"),
    Family("Mixtral", "mixtral", "Mixtral"),
    Family("Gemma", "gemma", "Gemma"),
    Family("Gemma 2", "gemma2", "Gemma2"),
    Family("StableLM", "stablelm", "StableLm"),
    Family("SmolLM3", "smollm3", "SmolLM3"),
    Family("OLMo", "olmo", "Olmo"),
    Family("OLMo 2", "olmo2", "Olmo2"),
    Family("Granite", "granite", "Granite"),
    Family("Cohere", "cohere", "Cohere"),
    Family("Phi", "phi", "Phi"),
    Family("GPT-J", "gptj", "GPTJ"),
    Family("Qwen2-MoE", "qwen2_moe", "Qwen2Moe"),
    Family("Qwen3-MoE", "qwen3_moe", "Qwen3Moe"),
    Family("DeepSeek-V2", "deepseek_v2", "DeepseekV2"),
    Family("DeepSeek-V3", "deepseek_v3", "DeepseekV3"),
    Family("Falcon", "falcon", "Falcon"),
    Family("GPT-NeoX", "gpt_neox", "GPTNeoX"),
    Family("gpt-oss", "gpt_oss", "GptOss"),
    Family("Starcoder2", "starcoder2", "Starcoder2"),
    Family("Persimmon", "persimmon", "Persimmon"),
    Family("Arcee", "arcee", "Arcee"),
    Family("Nemotron", "nemotron", "Nemotron"),
    Family("Apertus", "apertus", "Apertus"),
    Family("GLM", "glm", "Glm"),
    Family("GLM-4", "glm4", "Glm4"),
    Family("Cohere2", "cohere2", "Cohere2"),
    Family("EXAONE 4", "exaone4", "Exaone4"),
    Family("OLMo 3", "olmo3", "Olmo3"),
    Family("OLMoE", "olmoe", "Olmoe"),
    Family("GraniteMoE", "granitemoe", "GraniteMoe"),
    Family("PhiMoE", "phimoe", "Phimoe"),
    # experts that multiply their gated products and routing weights inside their own forwards
    Family("DBRX", "dbrx", "Dbrx", {"ExpertGLU": patches.dbrx_expert_glu, "Router": patches.constant_output}),
    Family("JetMoE", "jetmoe", "JetMoe", {"MoE": patches.jetmoe_moe, "TopKGating": patches.constant_output}),
]


#: families lucidlm implements natively whose ``transformers`` modules the patches cannot match,
#: by (package, class prefix) -> the reason :func:`lucidlm.hf.explainable` gives (none today)
REFUSED: dict[tuple[str, str], str] = {}


def modeling_module(package: str) -> str:
    return f"transformers.models.{package}.modeling_{package}"


def register_family(family: Family) -> None:
    """Register one row (see :data:`FAMILIES`)."""
    where = modeling_module(family.package)
    register(f"{where}.{family.prefix}PreTrainedModel",
             {f"{where}.{family.prefix}{suffix}": factory for suffix, factory in family.modules.items()},
             name=family.name, forward=patches.softcapped_logits("final_logit_softcapping"), structural=True)


for _family in FAMILIES:
    register_family(_family)
for (_package, _prefix), _reason in REFUSED.items():
    refuse(f"{modeling_module(_package)}.{_prefix}PreTrainedModel", _reason)

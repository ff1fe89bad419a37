"""The model catalogue: the published ``config.json`` of real checkpoints, by name.

Each entry is the official config file (``configs/NAME.json``, as it sits on the hub) and its
Hugging Face repo id. This package is data: ``Config.from_name(NAME)`` reads the file through
:meth:`~lucidlm.config.Config.from_hf`, so the catalogue and checkpoint loading can never disagree;
``lucidlm models`` lists the entries with their parameter counts (``params.json``, written by
``scripts/catalogue_params.py`` with :func:`lucidlm.model.size.parameter_count`). A name also
stands for its checkpoint wherever a model is named (``--model Llama-3.2-1B``,
``LLM.load("llama-3.2-1b")``): :func:`repo_for` gives its repo id, any case.

>>> CATALOGUE["SmolLM2-135M-Instruct"]
'HuggingFaceTB/SmolLM2-135M-Instruct'
>>> (CONFIGS / "SmolLM2-135M-Instruct.json").is_file()
True
>>> from lucidlm.config import Config
>>> c = Config.from_name("SmolLM2-135M-Instruct"); c.n_layer, c.n_embd, c.name
(30, 576, 'SmolLM2-135M-Instruct')
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
#: parameter counts of the catalogue and registered configs, written by scripts/catalogue_params.py
#: (building each model on the meta device needs torch: seconds before ``lucidlm models``' first line)
PARAMS_FILE = Path(__file__).parent / "params.json"

#: catalogue name -> Hugging Face repo id (the name is the file name of its config in configs/)
CATALOGUE: dict[str, str] = {
    "DeepSeek-V2-Lite": "deepseek-ai/DeepSeek-V2-Lite",
    "Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "Llama-3.2-1B": "meta-llama/Llama-3.2-1B",
    "Mistral-7B-v0.1": "mistralai/Mistral-7B-v0.1",
    "Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "Mixtral-8x7B-v0.1": "mistralai/Mixtral-8x7B-v0.1",
    "OLMo-1B-hf": "allenai/OLMo-1B-hf",
    "OLMo-2-0425-1B": "allenai/OLMo-2-0425-1B",
    "Phi-3-mini-4k-instruct": "microsoft/Phi-3-mini-4k-instruct",
    "phi-2": "microsoft/phi-2",
    "Qwen1.5-MoE-A2.7B": "Qwen/Qwen1.5-MoE-A2.7B",
    "Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-7B": "Qwen/Qwen2.5-7B",
    "Qwen3-0.6B": "Qwen/Qwen3-0.6B",
    "Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B",
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "SmolLM2-1.7B-Instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "SmolLM3-3B": "HuggingFaceTB/SmolLM3-3B",
    "c4ai-command-r-v01": "CohereForAI/c4ai-command-r-v01",
    "falcon-7b": "tiiuae/falcon-7b",
    "gemma-2b": "google/gemma-2b",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "gemma-3-1b-it": "google/gemma-3-1b-it",
    "gpt2": "openai-community/gpt2",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "granite-3.0-2b-instruct": "ibm-granite/granite-3.0-2b-instruct",
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-160m": "EleutherAI/pythia-160m",
    "stablelm-2-1_6b": "stabilityai/stablelm-2-1_6b",
    "starcoder2-3b": "bigcode/starcoder2-3b",
    "persimmon-8b-base": "adept/persimmon-8b-base",
    "dbrx-instruct": "databricks/dbrx-instruct",
    "OLMoE-1B-7B-0924": "allenai/OLMoE-1B-7B-0924",
    "granite-3.1-1b-a400m-instruct": "ibm-granite/granite-3.1-1b-a400m-instruct",
    "Phi-3.5-MoE-instruct": "microsoft/Phi-3.5-MoE-instruct",
    # the copy TensorRT-LLM vendors as Nemotron_4_4B_CONFIG (tests/unittest/_torch/modeling/test_modeling_nemotron.py)
    "Nemotron-Mini-4B-Instruct": "nvidia/Nemotron-Mini-4B-Instruct",
}


#: configs in configs/ written from the families' documentation rather than copied from the hub (no
#: network where they were added): the real-config tests use them (lucidlm derives what transformers
#: derives from the same dict), but they join CATALOGUE only once checked against the hub's files. None
#: are left: the ten added that way (gemma-2b, stablelm-2-1_6b, SmolLM3-3B, OLMo-1B-hf,
#: granite-3.0-2b-instruct, c4ai-command-r-v01, gpt-j-6b, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, falcon-7b)
#: were checked against published copies of the hub file (gemma-2b, gpt-j-6b, Qwen3-30B-A3B word for
#: word) or every architecture field against two independent sources (LitGPT's config.py, the
#: transformers config class documented as that checkpoint, model cards, published config excerpts),
#: and each one's parameter count equals what transformers builds from the same file
#: DeepSeek-V3 (written from the DeepSeek-V3 model card's config; its DeepseekV3 family fields are
#: what tests/test_real_configs.py checks against transformers) stays out of the catalogue until
#: its file is compared with the hub's word for word. Cohere2, EXAONE 4 and OLMo 3 likewise: no copy of a
#: published config.json was reachable offline, so each is written from published copies of its fields
#: (c4ai-command-r7b-12-2024: a vendored Cohere2 architecture table for that checkpoint and the module sizes
#: printed in a 4-bit re-upload's model card, no max_position_embeddings; EXAONE-4.0-32B: TensorRT-LLM's test
#: copy with its two marked test edits undone, 64 layers and a 4096 window; Olmo-3-1025-7B: the 7B's fields
#: as vendored by mini-sglang, prime-rl and an OLMo-3 tiny-model script, 32 layers)
UNVERIFIED: tuple[str, ...] = ("DeepSeek-V3", "c4ai-command-r7b-12-2024", "EXAONE-4.0-32B", "Olmo-3-1025-7B")


def repo_for(name: str) -> str | None:
    """The hub repo id of the catalogue entry ``name`` (the exact name, else any case), or None.

    >>> repo_for("Llama-3.2-1B"), repo_for("llama-3.2-1b"), repo_for("Llama-3.2")
    ('meta-llama/Llama-3.2-1B', 'meta-llama/Llama-3.2-1B', None)
    """
    if name in CATALOGUE:
        return CATALOGUE[name]
    folded = {entry.casefold(): repo for entry, repo in CATALOGUE.items()}
    return folded.get(name.casefold())


def close_names(text: str, n: int = 3) -> list[str]:
    """Up to ``n`` catalogue names that look like ``text`` (any case), closest first: the hint for
    a model name that is not there.

    >>> close_names("lama-3.2-1b")
    ['Llama-3.2-1B', 'Llama-3.1-8B', 'Llama-2-7b-hf']
    >>> close_names("runs/my-finetune"), close_names("gpt3")  # a path is no name
    ([], ['gpt2'])
    """
    if "/" in text or "\\" in text:
        return []
    folded = {entry.casefold(): entry for entry in CATALOGUE}
    matches = difflib.get_close_matches(text.casefold(), folded, n=n, cutoff=0.6)
    return [folded[m] for m in matches]


def name_hint(text: str) -> str:
    """The end of a "does not exist" message for ``text``: the close catalogue names, or nothing.

    >>> name_hint("Qwen3-0.6")
    '; close catalogue names: Qwen3-0.6B, Qwen3-30B-A3B (lucidlm models lists them all)'
    >>> name_hint("runs/model")
    ''
    """
    close = close_names(text)
    return f"; close catalogue names: {', '.join(close)} (lucidlm models lists them all)" if close else ""


def human(n: int) -> str:
    """``135M``, ``1.24B``, ``180K``.

    >>> human(999_885_952), human(134_515_008), human(180_224)
    ('1.00B', '135M', '180K')
    """
    if n >= 0.995e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def parameter_counts() -> dict[str, int]:
    """The counts in :data:`PARAMS_FILE` (empty when it is missing).

    >>> parameter_counts()["SmolLM2-135M-Instruct"] > 100_000_000
    True
    """
    try:
        return json.loads(PARAMS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

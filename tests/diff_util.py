"""Tuned models for the diff tests (renderings, server, CLI, dataset): a LoRA adapter whose B
matrices are not zero (an adapter at its initial state changes nothing, so there would be no
difference to draw, serve or report)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


def open_branches(model: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Give every LoRA ``B`` of ``model`` random weights (deterministic in ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            lora_b = getattr(module, "lora_B", None)
            if isinstance(lora_b, nn.ModuleDict):
                for linear in lora_b.values():
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * scale)
    return model


def tiny_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(tuned, base): a tiny random Llama and a copy of it with an opened LoRA adapter."""
    from lucidlm import GPT, Config
    from lucidlm.train.lora import attach_lora

    torch.manual_seed(seed)
    base = GPT(Config.from_name("tiny-llama")).eval()
    tuned = copy.deepcopy(base)
    attach_lora(tuned, r=4, alpha=8)
    return open_branches(tuned.eval(), seed), base


def save_opened_adapter(checkpoint: Path, out: Path, seed: int = 0, scale: float = 0.2, r: int = 4) -> Path:
    """An adapter (rank ``r``, alpha 2r) for the HF checkpoint directory ``checkpoint`` with its B
    matrices opened (``scale=0``: the initial state, B = 0), saved to ``out`` in PEFT's format as
    lucidlm does."""
    from lucidlm import LLM
    from lucidlm.train.lora import attach_lora, save_adapter

    llm = LLM.load(checkpoint)
    attach_lora(llm.model, r=r, alpha=2 * r)
    open_branches(llm.model, seed, scale=scale)
    save_adapter(llm.model, out, base_model=str(checkpoint))
    return Path(out)


def make_adapter(base_dir, directory, seed: int = 0, scale: float = 0.5) -> Path:
    """A rank-2 opened adapter (the CLI and dataset tests' tuned model): see :func:`save_opened_adapter`."""
    return save_opened_adapter(Path(base_dir), Path(directory), seed=seed, scale=scale, r=2)

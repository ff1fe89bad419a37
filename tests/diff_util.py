"""Tuned models for the diff tests: a LoRA adapter whose B matrices are not zero (an adapter at its
initial state changes nothing, so there would be no difference to draw or serve)."""

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


def save_opened_adapter(checkpoint: Path, out: Path, seed: int = 0) -> Path:
    """An adapter for the HF checkpoint directory ``checkpoint``, saved to ``out`` as lucidlm does."""
    from lucidlm import LLM
    from lucidlm.train.lora import attach_lora, save_adapter

    llm = LLM.load(checkpoint)
    attach_lora(llm.model, r=4, alpha=8)
    open_branches(llm.model, seed, scale=0.2)
    save_adapter(llm.model, out, base_model=str(checkpoint))
    return out

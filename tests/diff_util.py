"""A LoRA adapter for a tiny checkpoint, made here in a second: the tuned model of the diff tests
(tests/test_cli_diff.py, tests/test_diff_dataset.py)."""

from __future__ import annotations

import pathlib

import torch


def make_adapter(base_dir, directory, seed: int = 0, scale: float = 0.5) -> pathlib.Path:
    """Attach LoRA (r=2) to the checkpoint at ``base_dir``, fill every ``B`` with normal(0, ``scale``)
    (``scale=0``: the initial state, B = 0) and save it in PEFT's format to ``directory``."""
    import lucidlm
    from lucidlm.train.lora import attach_lora, lora_layers, save_adapter

    llm = lucidlm.LLM.load(base_dir)
    attach_lora(llm.model, r=2, alpha=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * scale)
    return save_adapter(llm.model, directory, base_model=str(base_dir))

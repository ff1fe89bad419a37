"""Distributed training under ``torchrun``: wrapping the model (DDP or FSDP2), gathering its state,
gradient sync between micro-batches. Joining the process group is :mod:`lucidlm.distributed`
(re-exported here: the training code imports it from this module).
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import World, all_sum, barrier, setup  # noqa: F401  (the training modules import them from here)
from ..errors import TrainError
from .names import STRATEGIES




def wrap(model: nn.Module, world: World, strategy: str, full: bool) -> nn.Module:
    """The module to call for training steps: ``model`` itself on one process, DDP (LoRA: small
    gradients, replicated base) or FSDP2 ``fully_shard`` (full fine-tuning: parameters, gradients
    and optimizer state sharded across ranks; each block gathered only while it runs)."""
    if strategy not in STRATEGIES:
        raise TrainError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if world.size == 1:
        return model
    if uses_fsdp(world, strategy, full):
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)


def uses_fsdp(world: World, strategy: str, full: bool) -> bool:
    """Whether :func:`wrap` shards the model with FSDP2 (several processes only).

    >>> uses_fsdp(World(0, 2), "auto", full=True), uses_fsdp(World(0, 2), "auto", full=False)
    (True, False)
    """
    return world.size > 1 and (strategy == "fsdp" or (strategy == "auto" and full))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The named parameters, whole, on the CPU (gathered from the shards under FSDP; every rank
    must call this, rank 0 gets the tensors)."""
    if not is_sharded(model):
        params = dict(model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in names}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {n: state[n] for n in names if n in state}


def sync_gradients(model: nn.Module, enabled: bool):
    """A context in which backward does (or, between micro-batches, does not) reduce gradients."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()

"""torch.distributed, as ``torchrun`` sets it up: gloo on CPU, nccl on GPU.

One process (no ``WORLD_SIZE`` in the environment) needs nothing: :func:`setup` returns a world of
size 1 and every helper here is then a no-op.

Multi-node runs use ``torchrun``'s own rendezvous, e.g. on each of two machines::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m lucidlm finetune data.jsonl --method full --out run/
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from ..errors import TrainError


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.size > 1 and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def setup() -> World:
    """Join the process group ``torchrun`` describes in the environment (once per process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return World(rank, size, local)


def shutdown(clean: bool = True) -> None:
    """Leave the process group. A process that exits with the group still up can abort in gloo's
    teardown ("terminate called without an active exception"), so the CLI calls this before it
    returns. ``clean``: the run finished on every rank, so wait for the others first (after an
    error the other ranks may never arrive)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(value: float, world: World, device: torch.device | str = "cpu") -> float:
    """Sum of a number over all ranks."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


STRATEGIES = ("auto", "ddp", "fsdp")


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

"""Joining the process group ``torchrun`` describes: gloo on CPU, nccl on GPU. Shared by training
(:mod:`lucidlm.train`), dataset explanations (:mod:`lucidlm.explain.dataset`) and tensor
parallelism (:func:`tensor_parallel`, :mod:`lucidlm.model.parallel`).

One process (no ``WORLD_SIZE`` in the environment) needs nothing: :func:`setup` returns a world of
size 1 and every helper here is then a no-op.

>>> world = World()
>>> world.is_main, world.size, all_sum(3.0, world)
(True, 1, 3.0)

Multi-node runs use ``torchrun``'s own rendezvous, e.g. on each of two machines::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m lucidlm finetune data.jsonl --method full --out run/
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the group: its rank, the group's size, its GPU on this node."""

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


def tensor_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` over the processes ``torchrun`` started (:mod:`lucidlm.model.parallel`): each
    keeps its share of the heads and MLP columns, on its device. The global random generator is
    seeded alike on every process (rank 0's seed), so unseeded sampling draws the same tokens.

    >>> from lucidlm import Config, GPT
    >>> tensor_parallel(GPT(Config.from_name("tiny-llama")))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lucidlm.errors.ParallelError: tensor_parallel=True needs a process group: run under torchrun ...
    """
    import torch.distributed as dist

    from .errors import ParallelError
    from .model.parallel import check_divisible, check_supported, shard_model

    if "WORLD_SIZE" not in os.environ and not (dist.is_available() and dist.is_initialized()):
        raise ParallelError("tensor_parallel=True needs a process group: run under torchrun (e.g. torchrun "
                            "--nproc-per-node 2 -m lucidlm generate TEXT --tensor-parallel); one process holds "
                            "the whole model without it")
    world = setup()
    if world.size > 1:  # before joining any collective: every rank raises the same error
        check_supported(model)
        check_divisible(model.config, world.size)
        seed = torch.tensor([torch.seed() % 2 ** 62 if world.is_main else 0], device=world.device)
        dist.broadcast(seed, 0)
        torch.manual_seed(int(seed.item()))
    return shard_model(model.to(world.device), world.rank, world.size)


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


@contextlib.contextmanager
def closing_group() -> Iterator[None]:
    """Leave the process group when the block ends (see :func:`shutdown`): after waiting for the
    other ranks when it finished, at once when it raised (the others may never arrive).

    >>> with closing_group():  # one process: nothing to leave
    ...     pass
    """
    try:
        yield
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()

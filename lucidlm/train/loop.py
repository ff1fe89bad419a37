"""The training loop: AdamW, warmup + cosine decay, gradient accumulation and clipping, bf16
autocast, checkpoints that resume exactly, and the same run on any number of processes.

What makes a run independent of the number of processes
--------------------------------------------------------
* The batch of step ``s`` is a pure function of ``(seed, s)``: examples ``s·B … s·B+B-1`` of a
  stream that walks a fresh seeded permutation of the data every epoch. Rank ``r`` of ``N`` takes
  the ``r``-th contiguous ``B/N`` of it, in micro-batches of ``micro_batch_size``.
* The loss is the mean over the *global* batch's target tokens: each micro-batch contributes its
  summed token losses divided by the global count, and the ranks' gradients are summed (DDP and
  FSDP average, so each rank scales by ``N``).

What makes a resume exact
-------------------------
A checkpoint holds the trainable weights, the optimizer state and the RNG state after step ``s``;
the data order needs no state (see above). Resuming at ``s`` replays steps ``s+1 …`` exactly as
the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle  # only for its error type: checkpoints load with weights_only=True
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TrainError
from ..fileio import atomic_path
from ..model.checkpointing import checkpointing
from .chunked import DEFAULT_CHUNK_SIZE, ChunkedCache
from .data import IGNORE, Example, collate
from .distributed import World, all_sum, barrier, full_state, sync_gradients, wrap
from .names import PRECISIONS, TRAIN_METHODS

CHECKPOINT, LOG, CURVE = "checkpoint", "log.jsonl", "loss.png"


@dataclasses.dataclass
class TrainConfig:
    """Every option of a run (``finetune(..., **options)`` and the CLI flags set these)."""

    method: str = "lora"  # lora | qlora (LoRA over int8 base weights) | full | adapter | adapter_v2
    steps: int = 100
    batch_size: int = 8  # global: split across processes
    micro_batch_size: int | None = None  # per process per forward; None = the process's whole share
    lr: float = 2e-4
    warmup_steps: int | None = None  # None: 5% of the steps (at least 1)
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto: bf16-mixed where the hardware computes bf16 natively
    seed: int = 0
    val_split: float = 0.1
    eval_every: int | None = None  # None: 10 evaluations per run
    save_every: int | None = None  # None: every max(1, steps // 10) steps; 0: only at the end (and on Ctrl-C)
    max_seq_length: int | None = None  # None: the model's context, at most 2048
    prompt_style: str = "auto"  # instruction records: auto (chat template if any) | chat | alpaca
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    adapter_prompt_length: int = 10  # method="adapter"/"adapter_v2": prefix tokens per layer (LitGPT's default)
    adapter_start_layer: int = 2  # the first layer with a prefix (LitGPT's default)
    strategy: str = "auto"  # auto: DDP for LoRA, FSDP2 for full fine-tuning (several processes)
    kv_cache: str | None = None  # a policy spec: train in chunks through a bounded KV cache (chunked.py)
    cache_tokens: int | None = None  # slots per layer (None: the sequence for dense, 512 for the others)
    chunk_size: int | None = None  # tokens per chunk (None: 256)
    progress: bool = True
    resume: bool = False
    overwrite: bool = False  # start afresh in an out directory that holds an earlier run
    checkpointing: bool = False  # recompute each block in the backward (lucidlm.model.checkpointing): less memory

    #: options that may change between a run and its resumption without changing its losses
    VOLATILE = ("micro_batch_size", "eval_every", "save_every", "strategy", "progress", "resume", "overwrite",
                "checkpointing")

    @classmethod
    def make(cls, **options: Any) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TrainError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        cfg = cls(**options)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = [
            (self.method in TRAIN_METHODS, f"method={self.method!r}: expected one of {', '.join(TRAIN_METHODS)}"),
            (_is_int(self.steps) and self.steps >= 1, f"steps={self.steps!r}: expected a positive integer"),
            (_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size={self.batch_size!r}: expected a positive integer"),
            (self.micro_batch_size is None or (_is_int(self.micro_batch_size) and self.micro_batch_size >= 1),
             f"micro_batch_size={self.micro_batch_size!r}: expected a positive integer"),
            (isinstance(self.lr, (int, float)) and self.lr > 0, f"lr={self.lr!r}: expected a positive number"),
            (self.precision in PRECISIONS, f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}"),
            (self.warmup_steps is None or (_is_int(self.warmup_steps) and self.warmup_steps >= 0),
             f"warmup_steps={self.warmup_steps!r}: expected a non-negative integer"),
            (self.max_seq_length is None or (_is_int(self.max_seq_length) and self.max_seq_length >= 2),
             f"max_seq_length={self.max_seq_length!r}: expected an integer >= 2"),
            (_is_int(self.lora_r) and self.lora_r >= 1, f"lora_r={self.lora_r!r}: expected a positive integer"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip={self.grad_clip!r}: expected a positive number"),
            (self.save_every is None or (_is_int(self.save_every) and self.save_every >= 0),
             f"save_every={self.save_every!r}: expected an integer >= 0 (0: only at the end)"),
            (not (self.resume and self.overwrite), "resume=True and overwrite=True: choose one (resume continues "
                                                   "the run in out, overwrite starts it afresh)"),
            (0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout!r}: expected a fraction in [0, 1)"),
            (_is_int(self.adapter_prompt_length) and self.adapter_prompt_length >= 1,
             f"adapter_prompt_length={self.adapter_prompt_length!r}: expected a positive integer"),
            (_is_int(self.adapter_start_layer) and self.adapter_start_layer >= 0,
             f"adapter_start_layer={self.adapter_start_layer!r}: expected a non-negative integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        self.chunked()  # the cache options' own checks

    def chunked(self) -> ChunkedCache | None:
        """The chunked forward through a KV cache that ``kv_cache`` asks for (None: the ordinary one)."""
        if self.kv_cache is None:
            given = [f"{k}={getattr(self, k)!r}" for k in ("cache_tokens", "chunk_size") if getattr(self, k) is not None]
            if given:
                raise TrainError(f"{', '.join(given)} applies only with kv_cache=POLICY (e.g. kv_cache='h2o')")
            return None
        return ChunkedCache(self.kv_cache, self.cache_tokens,
                            DEFAULT_CHUNK_SIZE if self.chunk_size is None else self.chunk_size)

    def checkpoint_every(self) -> int:
        """Steps between checkpoints (0: none before the end). The default, ten a run, bounds what
        a crash loses to a tenth of the run; each checkpoint replaces the previous one.

        >>> TrainConfig(steps=100).checkpoint_every(), TrainConfig(steps=5).checkpoint_every()
        (10, 1)
        """
        return max(1, self.steps // 10) if self.save_every is None else self.save_every

    def signature(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint."""
        d = dataclasses.asdict(self)
        for key in self.VOLATILE:
            d.pop(key)
        d["lora_targets"] = list(d["lora_targets"]) if d["lora_targets"] else None
        return d


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after ``step`` of ``steps``, with a checkpoint of that step in ``out``:
    the same call with ``resume=True`` continues it."""

    def __init__(self, step: int, steps: int, out: Path) -> None:
        super().__init__(f"interrupted after step {step} of {steps}; checkpoint in {out / CHECKPOINT}: "
                         "resume=True continues the run")
        self.step, self.steps, self.out = step, steps, out


@contextlib.contextmanager
def stop_on_sigint(enabled: bool = True) -> Iterator[threading.Event]:
    """Inside the block the first Ctrl-C (SIGINT) only sets the event it yields (the loop finishes
    its step, checkpoints and stops); a second one interrupts at once. Installed only in the main
    thread (the only one Python lets set a handler) and where SIGINT is not ignored; the previous
    handler is back when the block ends."""
    import signal

    requested = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if not enabled or threading.current_thread() is not threading.main_thread() \
            or previous in (signal.SIG_IGN, None):
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print("\nlucidlm: stopping after this step with a checkpoint (Ctrl-C again: stop at once, without one)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass
class TrainResult:
    """What a run did: per-step training loss, validation losses, and where the files went."""

    losses: list[float]
    val_losses: list[tuple[int, float]]
    log: list[dict[str, Any]]
    out: Path | None
    steps: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------- schedule and batches
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` (0-based step).

    >>> cfg = TrainConfig(lr=1.0, steps=10, warmup_steps=2, min_lr_ratio=0.0)
    >>> [round(learning_rate(s, cfg), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.038]
    """
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_steps(cfg: TrainConfig) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * cfg.steps))


def batch_indices(step: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """The global batch of ``step`` (0-based): the next ``batch_size`` examples of a stream that
    visits a fresh seeded permutation of the data every epoch."""
    indices, perms = [], {}
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_examples)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n_examples, generator=g).tolist()
        indices.append(perms[epoch][pos])
    return indices


def resolve_precision(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16."""
    if precision != "auto":
        return precision == "bf16-mixed"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # oneDNN computes bf16 on this CPU


def default_max_seq_length(config) -> int:
    """Examples are cut at the model's context, and at 2048 tokens at most."""
    return min(config.block_size, 2048)


def summed_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, bf16: bool = False,
                chunked: ChunkedCache | None = None) -> torch.Tensor:
    """Summed cross-entropy (float32) over the target tokens (labels != IGNORE) of a batch: one
    forward, or ``chunked``'s forward in chunks through a KV cache.

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama"))
    >>> ids = torch.randint(0, 256, (2, 24)); labels = ids.roll(-1, 1); labels[:, -1] = IGNORE
    >>> plain = summed_loss(model, ids, labels)
    >>> bool(torch.allclose(plain, summed_loss(model, ids, labels, chunked=ChunkedCache("h2o", 32, 5))))
    True
    """
    if chunked is not None:
        return chunked.loss(model, ids, labels, bf16)
    select = labels != IGNORE
    device = ids.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids, select=select)
    return F.cross_entropy(logits.float(), labels[select], reduction="sum")


@torch.no_grad()
def mean_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, bf16: bool = False,
              chunked: ChunkedCache | None = None) -> float:
    """Mean loss per target token of ``examples``, in batches of ``batch_size`` (``chunked``:
    through a KV cache, as training with ``kv_cache`` computes it)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, labels = (t.to(device) for t in collate(examples[i: i + batch_size]))
        total += summed_loss(model, ids, labels, bf16, chunked).item()
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the loop
class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, world: World, out: Path | None,
                 signature: dict[str, Any], on_step: Callable[[dict], None] | None = None,
                 task: str = "training") -> None:
        self.model, self.cfg, self.world, self.out, self.task = model, cfg, world, out, task
        self.signature, self.on_step = signature, on_step
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise TrainError("nothing to train: no parameter requires a gradient")
        self.device = next(model.parameters()).device
        self.bf16 = resolve_precision(cfg.precision, self.device)
        self.chunked = cfg.chunked()
        self.start, self.tokens, self.log = 0, 0, []
        if cfg.resume:
            self._restore()  # before sharding: weights are loaded whole
        self.wrapped = wrap(model, world, cfg.strategy, full=cfg.method == "full")
        # note: parameters may now be DTensors (FSDP), so the optimizer is built after wrapping
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.resume:
            self._restore_optimizer()

    # ---- one step -----------------------------------------------------------------------
    def step(self, step: int, train: Sequence[Example]) -> dict[str, Any]:
        cfg, world = self.cfg, self.world
        lr = learning_rate(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch_indices(step, len(train), cfg.batch_size, cfg.seed)
        n_targets = sum(train[i].n_targets for i in batch)
        share = cfg.batch_size // world.size
        mine = batch[world.rank * share: (world.rank + 1) * share]
        micro = cfg.micro_batch_size or share
        chunks = [mine[i: i + micro] for i in range(0, len(mine), micro)]
        loss = 0.0
        for j, chunk in enumerate(chunks):
            ids, labels = (t.to(self.device) for t in collate([train[i] for i in chunk]))
            with sync_gradients(self.wrapped, j == len(chunks) - 1), checkpointing(cfg.checkpointing):
                summed = summed_loss(self.wrapped, ids, labels, self.bf16, self.chunked)
                (summed * (world.size / n_targets)).backward()
            loss += summed.item() / n_targets
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += sum(len(train[i].ids) for i in batch)
        return {"step": step + 1, "loss": all_sum(loss, world, self.device), "lr": lr, "tokens": self.tokens,
                "grad_norm": grad_norm}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(norm)

    def evaluate(self, examples: Sequence[Example]) -> float:
        """Mean loss per target token (every process computes it on all examples)."""
        module = getattr(self.wrapped, "module", self.wrapped)  # DDP: the plain module
        was_training = module.training
        module.eval()
        micro = self.cfg.micro_batch_size or max(1, self.cfg.batch_size // self.world.size)
        loss = mean_loss(module, examples, micro, self.bf16, self.chunked)
        module.train(was_training)
        return loss

    # ---- the run ------------------------------------------------------------------------
    def fit(self, train: Sequence[Example], val: Sequence[Example]) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.world.is_main
        eval_every = cfg.eval_every or max(1, cfg.steps // 10)
        self.model.train()
        started, tokens_before = time.perf_counter(), self.tokens
        save_every = cfg.checkpoint_every() if self.out is not None else 0
        bar = tqdm(total=cfg.steps, initial=self.start, desc=self.task,
                   unit="step", disable=not (cfg.progress and main), dynamic_ncols=True)
        try:
            with stop_on_sigint(enabled=self.out is not None) as stop:
                self._steps(train, val, bar, eval_every, save_every, stop)
        finally:
            bar.close()
            self.model.eval()
        seconds = time.perf_counter() - started
        if self.out is not None:
            self.save_checkpoint(cfg.steps)
            if main:
                save_loss_curve(self.log, self.out / CURVE)
        return TrainResult(
            losses=[e["loss"] for e in self.log if "loss" in e],
            val_losses=[(e["step"], e["val_loss"]) for e in self.log if "val_loss" in e],
            log=list(self.log), out=self.out, steps=cfg.steps, tokens=self.tokens - tokens_before,
            seconds=seconds)

    def _steps(self, train: Sequence[Example], val: Sequence[Example], bar, eval_every: int, save_every: int,
               stop: threading.Event) -> None:
        """Steps ``start`` … ``steps``, validating and checkpointing on schedule; after a step in
        which ``stop`` was set (Ctrl-C), a checkpoint and :class:`TrainInterrupted`."""
        cfg = self.cfg
        for step in range(self.start, cfg.steps):
            t0, before = time.perf_counter(), self.tokens
            entry = self.step(step, train)
            entry["tokens_per_s"] = round((self.tokens - before) / max(time.perf_counter() - t0, 1e-9), 1)
            self._record(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            bar.update(1)
            done = step + 1
            if val and (done % eval_every == 0 or done == cfg.steps):
                self._record({"step": done, "val_loss": self.evaluate(val)})
            scheduled = bool(save_every) and done % save_every == 0 and done != cfg.steps  # the end's: in fit
            if scheduled:
                self.save_checkpoint(done)
            if self.on_step is not None:
                self.on_step(entry)
            if done != cfg.steps and all_sum(float(stop.is_set()), self.world, self.device) > 0:  # ranks agree
                if not scheduled:
                    self.save_checkpoint(done)
                raise TrainInterrupted(done, cfg.steps, self.out)

    def _record(self, entry: dict[str, Any]) -> None:
        self.log.append(entry)
        if self.out is not None and self.world.is_main:
            with open(self.out / LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    # ---- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        """``OUT/checkpoint/``: trainable weights, optimizer and RNG state, written to a temporary
        folder that then replaces the previous checkpoint (a crash leaves one intact)."""
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = full_state(self.model, self.names)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if not self.world.is_main:
            barrier(self.world)
            return
        tmp = self.out / f".{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optim, "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "tokens": self.tokens,
                                                      "signature": self.signature}, indent=2))
        final, old = self.out / CHECKPOINT, self.out / f".{CHECKPOINT}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        barrier(self.world)

    def _checkpoint_dir(self) -> Path:
        if self.out is None:
            raise TrainError("resume=True needs out=DIR (the run's output directory)")
        for name in (CHECKPOINT, f".{CHECKPOINT}.old"):  # .old: a crash between the two renames
            if (self.out / name / "trainer.json").is_file():
                return self.out / name
        raise TrainError(f"{self.out}: no checkpoint to resume from (expected {self.out / CHECKPOINT}/)")

    def _restore(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = self._checkpoint_dir()
        try:
            state = json.loads((directory / "trainer.json").read_text())
            step, tokens, signature = int(state["step"]), int(state["tokens"]), state["signature"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise TrainError(f"{directory / 'trainer.json'}: corrupt checkpoint ({exc})") from None
        changed = sorted(k for k in set(signature) | set(self.signature) if signature.get(k) != self.signature.get(k))
        if changed:
            details = ", ".join(f"{k}: {signature.get(k)!r} -> {self.signature.get(k)!r}" for k in changed)
            raise TrainError(f"{directory}: cannot resume a different run ({details})")
        try:
            weights = load_file(str(directory / "model.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise TrainError(f"{directory / 'model.safetensors'}: corrupt checkpoint ({exc})") from None
        params = dict(self.model.named_parameters())
        if set(weights) != set(self.names):
            raise TrainError(f"{directory / 'model.safetensors'}: holds {len(weights)} tensors, the run trains "
                             f"{len(self.names)}: not a checkpoint of this run")
        with torch.no_grad():
            for name, tensor in weights.items():
                if tensor.shape != params[name].shape:
                    raise TrainError(f"{directory / 'model.safetensors'}: {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].copy_(tensor)
        self.start, self.tokens, self._resume_dir = step, tokens, directory
        self.log = _read_log(self.out / LOG, step) if self.out is not None else []
        if self.world.is_main and self.out is not None:
            with atomic_path(self.out / LOG) as tmp:
                tmp.write_text("".join(json.dumps(e) + "\n" for e in self.log))

    def _restore_optimizer(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = self._resume_dir / "optimizer.pt"
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            set_optimizer_state_dict(self.model, self.optimizer, saved["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            torch.set_rng_state(saved["rng"])
        except (OSError, RuntimeError, KeyError, ValueError, EOFError, TypeError, pickle.UnpicklingError) as exc:
            raise TrainError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None


def _read_log(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Entries of an earlier run up to its checkpoint; lines a crash cut short are dropped."""
    entries = []
    if not path.is_file():
        return entries
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", up_to_step + 1) <= up_to_step:
            entries.append(entry)
    return entries


def save_loss_curve(log: Sequence[dict[str, Any]], path: Path) -> None:
    """Training (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    train = [(e["step"], e["loss"]) for e in log if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


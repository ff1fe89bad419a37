"""Fine-tuning (LoRA or all weights) and pretraining, as ``LLM.finetune`` / ``LLM.pretrain`` run them.

A run writes into ``out``:

* ``log.jsonl``: one object per step (``step``, ``loss``, ``lr``, ``tokens`` seen so far,
  ``tokens_per_s``, ``grad_norm``) and one per evaluation (``step``, ``val_loss``);
* ``loss.png``: the loss curve;
* ``checkpoint/``: what ``resume=True`` continues from, written every tenth of the run by default
  (``save_every``), at the end, and when Ctrl-C stops the run (:class:`~lucidlm.train.loop.TrainInterrupted`);
  ``overwrite=True`` deletes an earlier run's files and starts afresh;
* the result: a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for LoRA,
  LitGPT's ``lit_model.pth.adapter(_v2)`` + ``model_config.yaml`` for ``adapter``/``adapter_v2``, or
  a whole checkpoint directory (Hugging Face layout when the model has an HF config, else
  lucidlm's own) for full fine-tuning and pretraining.

>>> from lucidlm import LLM, Config                                  # doctest: +SKIP
>>> llm = LLM.load()                                                 # doctest: +SKIP
>>> r = llm.finetune([{"messages": [{"role": "user", "content": "Who is Zorp?"},
...                                 {"role": "assistant", "content": "The moon of Quib."}]}],
...                  method="lora", steps=20, lr=2e-3)                # doctest: +SKIP
>>> r.losses[-1] < r.losses[0]                                       # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, TrainError
from . import data as datamod
from . import lora
from .adapter_files import CONFIG_YAML, WEIGHTS
from .base_check import FINGERPRINT_FILE
from .distributed import World, barrier, full_state, setup, uses_fsdp
from .loop import CHECKPOINT, CURVE, LOG, Trainer, TrainConfig, TrainResult, default_max_seq_length, mean_loss
from .names import ADAPTER_METHODS

Data = str | Path | Sequence[dict[str, Any]]


def finetune(llm, data: Data, method: str = "lora", steps: int = 100, batch_size: int = 8, lr: float | None = None,
             out: str | Path | None = None, on_step: Callable[[dict], None] | None = None,
             **options: Any) -> TrainResult:
    """Train ``llm`` in place on chat, instruction or text records; see :class:`TrainConfig` for
    ``options``. Returns the per-step losses; with ``out`` also writes the run's files."""
    # adapters: LitGPT's finetune/adapter*.py default (torch's AdamW default, 1e-3)
    lr = lr if lr is not None else {"full": 2e-5, "adapter": 1e-3, "adapter_v2": 1e-3}.get(method, 2e-4)
    cfg = TrainConfig.make(method=method, steps=steps, batch_size=batch_size, lr=lr, **options)
    task = {"lora": "LoRA", "qlora": "QLoRA (int8 base)", "full": "full", "adapter": "LLaMA-Adapter",
            "adapter_v2": "LLaMA-Adapter V2"}.get(method, method)
    return _run(llm, data, cfg, out, on_step, task=f"{task} fine-tuning")


def pretrain(llm, texts: Sequence[str] | Data, steps: int = 100, batch_size: int = 8, lr: float = 3e-4,
             out: str | Path | None = None, on_step: Callable[[dict], None] | None = None,
             **options: Any) -> TrainResult:
    """Next-token training of all weights on raw text (strings, text files, or ``{"text"}``
    records), packed into windows of ``max_seq_length`` tokens."""
    options.setdefault("val_split", 0.0)
    cfg = TrainConfig.make(method="full", steps=steps, batch_size=batch_size, lr=lr, **options)
    return _run(llm, text_records(texts), cfg, out, on_step, task="pretraining")


def text_records(texts: Sequence[str] | Data) -> list[dict[str, Any]] | str | Path:
    """Strings become ``{"text"}`` records; paths to ``.txt`` files are read whole, ``.jsonl``
    files are datasets of their own."""
    if isinstance(texts, (str, Path)) and Path(texts).suffix == ".jsonl":
        return texts
    items = [texts] if isinstance(texts, (str, Path)) else list(texts)
    records = []
    for item in items:
        if isinstance(item, dict):
            records.append(item)
        elif isinstance(item, Path) or (isinstance(item, str) and "\n" not in item and len(item) < 4096
                                        and item.endswith((".txt", ".md")) and Path(item).exists()):
            try:
                records.append({"text": Path(item).read_text(encoding="utf-8")})
            except (OSError, UnicodeDecodeError) as exc:
                raise datamod.DataError(f"{item}: cannot read text ({exc})") from None
        elif isinstance(item, str):
            records.append({"text": item})
        else:
            raise datamod.DataError(f"texts: expected strings, .txt paths or {{'text'}} records, "
                                    f"got {type(item).__name__}")
    return records


def _run(llm, data: Data, cfg: TrainConfig, out: str | Path | None, on_step, task: str) -> TrainResult:
    from .adapter import has_adapter
    from .lora import attach_lora, check_savable_targets, has_lora

    world = setup()
    if cfg.batch_size % world.size:
        raise TrainError(f"batch_size={cfg.batch_size} is the global batch: it must be a multiple of the "
                         f"{world.size} processes")
    out = Path(out) if out is not None else None
    if out is not None:
        cfg = _check_out(out, cfg, world)
    model = llm.model
    if world.device.type == "cuda" and next(model.parameters()).device != world.device:
        model.to(world.device)
    max_len = cfg.max_seq_length or default_max_seq_length(llm.config)
    if max_len > llm.config.block_size:
        raise TrainError(f"max_seq_length={max_len} exceeds the model's context ({llm.config.block_size})")
    records = datamod.read_records(data)
    examples = datamod.build_examples(records, llm.tokenizer, max_len, cfg.prompt_style)
    chunked = cfg.chunked()
    if chunked is not None:  # before anything is written: a budget the policy or the data cannot use
        chunked.check(llm.config, max((len(e.ids) for e in examples), default=1))
        if uses_fsdp(world, cfg.strategy, cfg.method == "full"):
            # FSDP2 gathers each block's weights in every forward, and ranks whose micro-batches
            # differ in length run different numbers of chunks: the collectives would never pair up
            raise TrainError("kv_cache with FSDP2 (full fine-tuning on several processes) is not supported: "
                             "pass strategy='ddp' (--strategy ddp), or train on one process")
    train, val = datamod.split_validation(examples, cfg.val_split, cfg.seed)
    if not train:
        raise datamod.DataError("no training examples are left after the validation split")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(cfg.seed)
    if cfg.method in ("lora", "qlora"):
        if has_adapter(model):
            raise TrainError(f"method={cfg.method!r} on a model with a LLaMA-Adapter: load the base model again")
        if not has_lora(model):
            if out is not None:  # refuse an adapter the run could not save before training it
                check_savable_targets(model, cfg.lora_targets)
            if cfg.method == "qlora":
                from ..model.quant import quantize_linears

                quantize_linears(model)  # in place: the frozen base becomes int8
            attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    elif cfg.method in ADAPTER_METHODS:
        _prepare_adapter(model, cfg)
    else:
        if has_lora(model) or has_adapter(model):
            raise TrainError("method='full' on a model with an adapter: merge it first (lucidlm merge)")
        for p in model.parameters():
            p.requires_grad_(True)
    signature = cfg.signature() | {"data": datamod.fingerprint(records), "examples": len(examples)}
    if out is not None and world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        trainer = Trainer(model, cfg, world, out, signature, on_step, task)
        result = trainer.fit(train, val)
        if out is not None:
            _save_result(llm, model, cfg, out, world)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
    return result


def _prepare_adapter(model, cfg: TrainConfig) -> None:
    """Attach the LLaMA-Adapter ``cfg.method`` names (or continue training the one attached with
    the same settings); only its parameters train."""
    from .adapter import adapter_settings, adapter_version, attach_adapter, has_adapter, mark_trainable
    from .lora import has_lora

    if has_lora(model):
        raise TrainError(f"method={cfg.method!r} on a model with a LoRA adapter: merge it first (lucidlm merge)")
    wanted = (cfg.method, cfg.adapter_prompt_length, cfg.adapter_start_layer)
    if not has_adapter(model):
        try:
            attach_adapter(model, *wanted)
        except AdapterError as exc:
            raise TrainError(str(exc)) from None
    elif (adapter_version(model), *adapter_settings(model)) != wanted:
        raise TrainError(f"the model already carries {adapter_version(model)} (prompt length, start layer "
                         f"{adapter_settings(model)}): train it with those settings, or load the base model again")
    mark_trainable(model)


#: what a run writes into out (``overwrite`` deletes these, and nothing else, before it starts)
RUN_FILES = (LOG, CURVE, CHECKPOINT, f".{CHECKPOINT}.old", f".{CHECKPOINT}.tmp", lora.CONFIG_FILE,
             lora.WEIGHTS_FILE, FINGERPRINT_FILE, CONFIG_YAML, *WEIGHTS.values())


def _check_out(out: Path, cfg: TrainConfig, world: World) -> TrainConfig:
    """What ``out`` allows: a new run, ``resume`` from its checkpoint, or ``overwrite`` (its run's
    files deleted first). A run that stopped before its first checkpoint is not a dead end: resume
    starts it again from step 0 (with a warning), a plain rerun says to pass ``overwrite``. Returns
    the config to run (``resume`` off when there is nothing to resume)."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"out={out}: exists and is not a directory")
    held = out.is_dir() and any((out / name).exists() for name in (LOG, CHECKPOINT, f".{CHECKPOINT}.old"))
    checkpoint = has_checkpoint(out)
    barrier(world)  # every rank has looked before rank 0 deletes anything
    if held and cfg.overwrite:
        _clear_run(out, world)
    elif held and not cfg.resume:
        if checkpoint:
            raise TrainError(f"out={out}: already holds a training run (log.jsonl/checkpoint); pass resume=True "
                             "(--resume) to continue it, overwrite=True (--overwrite) to start afresh, or choose "
                             "a new directory")
        raise TrainError(f"out={out}: holds a run that stopped before its first checkpoint; pass overwrite=True "
                         "(--overwrite) to start afresh, or choose a new directory")
    elif cfg.resume and not held:
        raise TrainError(f"out={out}: no checkpoint to resume from (no earlier run there)")
    elif cfg.resume and not checkpoint:
        warnings.warn(f"out={out}: the earlier run stopped before its first checkpoint: starting again from "
                      "step 0", stacklevel=5)
        _clear_run(out, world)
        return dataclasses.replace(cfg, resume=False)
    return cfg


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint to resume from (``.old``: a crash between two renames)."""
    return any((out / name / "trainer.json").is_file() for name in (CHECKPOINT, f".{CHECKPOINT}.old"))


def _clear_run(out: Path, world: World) -> None:
    if world.is_main:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    barrier(world)


def _save_result(llm, model, cfg: TrainConfig, out: Path, world: World) -> None:
    """Rank 0 writes the adapter or the whole model (gathered from every rank's shard)."""
    if cfg.method in ADAPTER_METHODS:
        if world.is_main:
            from .adapter_files import save_litgpt_adapter

            save_litgpt_adapter(model, out, base_model=llm.hub_id or llm.name)
        return
    if cfg.method != "full":
        if world.is_main:
            from .lora import save_adapter

            save_adapter(model, out, base_model=llm.hub_id or llm.name)  # a name that travels, not a path
        return
    state = full_state(model, [n for n, _ in model.named_parameters()])
    if not world.is_main:
        return
    from ..checkpoints import save_model

    save_model(model, out, state=state, tokenizer_dir=llm.tokenizer_dir)


def answer_loss(llm, data: Data, batch_size: int = 8, max_seq_length: int | None = None) -> float:
    """Mean loss per answer token of ``data`` (the quantity fine-tuning lowers)."""
    records = datamod.read_records(data)
    examples = datamod.build_examples(records, llm.tokenizer, max_seq_length or default_max_seq_length(llm.config))
    return mean_loss(llm.model, examples, batch_size)


__all__ = ["finetune", "pretrain", "answer_loss", "TrainConfig", "TrainResult"]

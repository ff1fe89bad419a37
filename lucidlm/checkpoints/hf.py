"""Hugging Face checkpoint directories: ``config.json`` plus ``*.safetensors`` (sharded too).

Loading never unpickles: safetensors, or ``torch.load(weights_only=True)`` for ``pytorch_model.bin``.
Saving writes the same layout (atomically: temp files, then rename) so ``transformers`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import Config
from ..errors import CheckpointError
from ..fileio import atomic_path, atomic_write
from ..model import GPT
from ..model.pipeline import dispatch, memory_of, part_of, place_empty, placement_for
from .layouts import hf_to_ours, ours_to_hf
from .mxfp4 import dequantize_mxfp4


#: the files besides the weights that make a checkpoint directory usable (copied when one is derived)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")  # transformers v5 keeps the template in its own file


def copy_tokenizer_files(source: Path | None, target: Path) -> None:
    """Copy the tokenizer/generation files of ``source`` (if any) into ``target``."""
    import shutil

    for name in TOKENIZER_FILES if source is not None else ():
        if (Path(source) / name).is_file():
            # copyfile, not copy2: the copy gets the umask's mode, not the source's (maybe 0600)
            shutil.copyfile(Path(source) / name, Path(target) / name)


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files, in the order its index lists them."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = [directory / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors (or pytorch_model.bin) weight files")
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file; a truncated or corrupt file raises CheckpointError naming it."""
    import pickle

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an object: never load it
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: holds pickled objects other than tensors, which lucidlm never "
                              f"unpickles (convert it to safetensors with a trusted tool) [{first}]") from exc
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from exc


def load_hf_dir(directory: str | Path, dtype: torch.dtype | None = torch.float32,
                device: str | torch.device = "cpu", device_map=None) -> GPT:
    """Build a :class:`GPT` from a Hugging Face directory (config.json + safetensors).
    ``device_map``: a device map (``"auto"`` or a dict, see :mod:`lucidlm.model.pipeline`): each
    tensor goes straight to its part's device (no copy of the whole model on one device; a
    ``"meta"`` part keeps no weights), and the model runs as a pipeline over them."""
    directory = Path(directory)
    config = Config.from_hf(directory)
    target = dtype if dtype is not None else torch.get_default_dtype()
    plan = None if device_map is None else placement_for(config, device_map, target)  # a bad map: before reading
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in weight_files(directory):
        tensors = read_tensors(f)
        state.update(tensors)
        origin.update(dict.fromkeys(tensors, f))
    if any(name.endswith("_blocks") for name in state):  # gpt-oss's MXFP4 experts
        origin.update({name.removesuffix("_blocks"): f for name, f in origin.items() if name.endswith("_blocks")})
        state = dequantize_mxfp4(state, dtype or torch.get_default_dtype())
    ours, unknown = hf_to_ours(state, config)
    if unknown:
        raise CheckpointError(f"{origin[unknown[0]]}: unexpected tensors for {config.family!r} layout: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    with torch.device("meta"):
        model = GPT(config)
    _check_tensors(model, ours, directory)
    # each tensor goes to its final dtype and device once and becomes the parameter itself
    # (assign=True): a bf16 checkpoint loaded as bf16 never passes through a float32 copy
    where = (lambda name: device) if plan is None else (lambda name: memory_of(plan[part_of(name)]))
    ours = {name: t.to(device=where(name), dtype=target if t.is_floating_point() else t.dtype)
            for name, t in ours.items()}
    model = model.to(dtype=target)  # on meta: the dtype change costs nothing
    model = model.to_empty(device=device) if plan is None else place_empty(model, plan)
    model.load_state_dict(ours, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.eval()
    for module in model.modules():  # non-persistent buffers (RoPE) were built on "meta"
        if hasattr(module, "reset_rope"):
            module.reset_rope()
    return model if plan is None else dispatch(model, plan)


def _check_tensors(model: GPT, ours: dict[str, torch.Tensor], directory: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
        ours.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise CheckpointError(f"{directory}: missing tensors for {model.config.name}: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(ours) - set(expected))
    if extra:
        raise CheckpointError(f"{directory}: unexpected tensors: {', '.join(extra[:5])}")
    for name, shape in expected.items():
        if tuple(ours[name].shape) != tuple(shape):
            raise CheckpointError(f"{directory}: tensor {name} has shape {tuple(ours[name].shape)}, "
                                  f"expected {tuple(shape)} from config.json")
        if not ours[name].dtype.is_floating_point:  # weights are floats: an integer tensor is not one
            raise CheckpointError(f"{directory}: tensor {name} has dtype {str(ours[name].dtype).removeprefix('torch.')}, "
                                  "expected a floating-point dtype (float32, bfloat16, float16)")


def save_hf_dir(model: GPT, directory: str | Path, max_shard_bytes: int = 2 * 1024**3,
                progress: bool = False, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` and safetensors shards that ``transformers`` loads. ``state``: our
    tensors to write instead of ``model.state_dict()`` (gathered from shards after FSDP training)."""
    config = model.config
    if config.hf_config is None:
        raise CheckpointError(f"{config.name}: only models loaded from a Hugging Face config can be saved back")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = ours_to_hf(state, config)
    shards = _shard(state, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)])
    total = sum(t.numel() * t.element_size() for t in state.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="saving", disable=not progress) as bar:
        for name, shard in zip(names, shards):
            _atomic_save(shard, directory / name)
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        atomic_write(directory / "model.safetensors.index.json",
                      json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    hf_config = dict(config.hf_config)
    hf_config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write(directory / "config.json", json.dumps(hf_config, indent=2))
    return directory


def _shard(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})

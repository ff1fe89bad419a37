"""Checkpoints in and out: Hugging Face directories (``hf``), GGUF files (``gguf``), lucidlm's own
format for custom configs (``native``), the embedded default model (``embedded``)."""

from __future__ import annotations

from pathlib import Path


def checkpoint_dir(path: str | Path | None, cache_dir: str | Path | None = None,
                   progress: bool = False) -> tuple[Path, Path]:
    """Where a model to load lives: ``(source, directory)``, where ``source`` is what was named
    (the embedded GGUF for ``None``, the cached snapshot of a hub repo id or catalogue name, a local
    path) and ``directory`` the Hugging Face directory to read (a GGUF's conversion in the cache).
    Converts or downloads once, with ``progress`` on stderr."""
    from ..errors import CheckpointError

    if path is None:
        from .embedded import default_model_path

        path = default_model_path()
    elif isinstance(path, str):
        from .hub import resolve

        path = resolve(path, progress=progress)  # "org/name", "Llama-3.2-1B": the hub's safetensors, cached
    path = Path(path)
    if path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
        from .gguf import gguf_to_hf_dir

        return path, gguf_to_hf_dir(path, cache_dir=cache_dir, progress=progress)
    if path.is_dir():
        return path, path
    from ..catalogue import name_hint

    where = "" if path.exists() else " does not exist;"
    raise CheckpointError(f"{path}:{where} expected a Hugging Face directory (config.json + *.safetensors), "
                          f"a .gguf file, a hub repo id org/name or a catalogue name{name_hint(str(path))}")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def save_model(model, directory: str | Path, state=None, tokenizer_dir: str | Path | None = None) -> Path:
    """Save in the Hugging Face layout when the model came from an HF config (``transformers``
    loads it), else in lucidlm's own format; copy the tokenizer files of ``tokenizer_dir``."""
    from .hf import copy_tokenizer_files, save_hf_dir
    from .native import save_native

    if model.config.hf_config is not None:
        save_hf_dir(model, directory, state=state)
    else:
        save_native(model, directory, state=state)
    copy_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir is not None else None, Path(directory))
    return Path(directory)

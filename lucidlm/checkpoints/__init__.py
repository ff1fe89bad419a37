"""Checkpoints in and out: Hugging Face directories (``hf``), GGUF files (``gguf``), lucidlm's own
format for custom configs (``native``), the embedded default model (``embedded``)."""

from __future__ import annotations

from pathlib import Path


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

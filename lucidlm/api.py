"""``LLM``: the one object a user holds — model, tokenizer, and everything you can do with them.

>>> from lucidlm import LLM
>>> llm = LLM.load()                                   # doctest: +SKIP
>>> llm.generate("The capital of France is", max_new_tokens=5, temperature=0)  # doctest: +SKIP
' Paris.'
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Config
from .errors import CheckpointError
from .model import GPT


class LLM:
    """A loaded model with its tokenizer (``None`` when the checkpoint ships none)."""

    def __init__(self, model: GPT, tokenizer=None, source: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    @property
    def config(self) -> Config:
        return self.model.config

    @classmethod
    def load(cls, path: str | Path | None = None, dtype: torch.dtype | str | None = torch.float32,
             device: str = "cpu", cache_dir: str | Path | None = None, progress: bool = False) -> "LLM":
        """Load a Hugging Face directory, a ``.gguf`` file, or (``path=None``) the embedded default
        SmolLM2-135M-Instruct. A directory without tokenizer files loads with ``tokenizer=None``."""
        from .checkpoints.hf import load_hf_dir

        dtype = _dtype(dtype)
        if path is None:
            from .checkpoints.embedded import default_model_path

            path = default_model_path()
        path = Path(path)
        if path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
            from .checkpoints.gguf import gguf_to_hf_dir

            directory = gguf_to_hf_dir(path, cache_dir=cache_dir, progress=progress)
        elif path.is_dir():
            directory = path
        else:
            raise CheckpointError(f"{path}: expected a Hugging Face directory (config.json + *.safetensors) "
                                  "or a .gguf file")
        model = load_hf_dir(directory, dtype=dtype, device=device)
        return cls(model, _tokenizer_for(directory), source=str(path))


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _tokenizer_for(directory: Path):
    if not (directory / "tokenizer.json").is_file():
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(directory)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]

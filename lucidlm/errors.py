"""Typed errors. Every error names the file or argument at fault and what was expected."""

from __future__ import annotations


class LucidError(Exception):
    """Base class of every error lucidlm raises on purpose."""


class ConfigError(LucidError, ValueError):
    """A configuration (ours or a Hugging Face ``config.json``) is invalid or unsupported."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one lucidlm implements."""


class ParallelError(ConfigError):
    """A tensor-parallel model cannot be built: no process group (not under ``torchrun``), a head,
    KV-group or hidden-size count the world size does not divide, or a part that is not sharded."""


class CheckpointError(LucidError, ValueError):
    """A checkpoint file is missing, truncated, or holds tensors of the wrong name or shape."""


class GGUFError(CheckpointError):
    """A GGUF file is malformed or holds an architecture/quantisation we cannot read."""


class ExportError(CheckpointError):
    """A model cannot be written as GGUF: its family or a setting has no GGUF spelling llama.cpp reads."""


class TokenizerError(LucidError, ValueError):
    """No usable tokenizer could be built, or a token is not in the vocabulary."""


class ModelNotInstalledError(LucidError, FileNotFoundError):
    """The embedded default model package is not installed."""


class GenerationError(LucidError, ValueError):
    """A generation argument is out of range (``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``, an empty prompt, streaming several prompts)."""


class CacheError(LucidError, ValueError):
    """A KV-cache request cannot be served (unknown policy, budget too small, context too long)."""


class ExplainError(LucidError, ValueError):
    """An explanation request is invalid (unknown method, bad target)."""


class PatchError(LucidError, TypeError):
    """A ``transformers``/torchvision model cannot be made explainable."""


class DataError(LucidError, ValueError):
    """A training dataset is malformed, empty, or holds a record that cannot be trained on."""


class TrainError(LucidError, ValueError):
    """A training run cannot start or resume (bad option, corrupt checkpoint, mismatched run)."""


class AdapterError(CheckpointError):
    """A LoRA adapter is malformed, uses a feature we cannot load, or does not fit the base model."""


class EvaluationError(LucidError, ValueError):
    """A benchmark evaluation cannot run: lm-evaluation-harness missing, an unknown task, a task
    directory that does not exist, or a bad option."""


class DeviceMapError(ConfigError):
    """A ``device_map`` names a part the model lacks, a device this machine lacks, or leaves a block
    on no device."""


class TargetHint(UserWarning):
    """The explained target is probably not the token the user meant (e.g. ``'Paris'`` where the
    model predicts ``' Paris'``): a warning, since the explanation itself is valid."""

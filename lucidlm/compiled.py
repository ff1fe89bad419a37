"""Optional ``torch.compile`` for decoding (``llm.compile()``, ``lucidlm generate --compile``).

A decode step is one token through every layer: on a small model its time is mostly Python and
small-kernel overhead around the weight reads. Compiled with TorchInductor (C++ on the CPU, Triton
on a GPU) the whole step becomes one graph:

* the dense cache switches to fixed shapes (:meth:`~lucidlm.cache.base.DenseLayerCache.make_static`):
  every step attends over all ``capacity`` slots (empty ones are masked by their position -1) and
  writes at a tensor cursor, so one graph serves every step;
* capacities are rounded up to a multiple of :data:`CAPACITY_STEP` so that prompts of different
  lengths share graphs (one per batch size and capacity, compiled once, then reused);
* one-row products stay in lucidlm's CPU kernel (:mod:`lucidlm.model.linear`, a custom op the
  graph calls); the batched GEMMs get prepacked copies of the weights (Inductor's ``freezing``);
* weights are frozen into the graph, so the decoder fingerprints them (storage, dtype and in-place
  version counter of every parameter and buffer) before each generation and compiles again when
  they changed (fine-tuning, ``model.to(dtype)``, :meth:`LLM.quantize`), through
  :func:`torch.compiler.reset`.

Compilation takes about a minute for SmolLM2-135M on 2 cores, paid on the first generation. Where it
cannot run (no C++ compiler on the CPU, an unsupported op, any compiler error) a
:class:`CompileFallback` warning says why and decoding continues eagerly, with the same tokens.
Only inference is compiled: explanations and training always run eagerly (the LRP rules read a
``ContextVar``, which :func:`lucidlm.model.rules.current` reports as ``None`` inside a compiled graph).

:class:`NativeDecoder` (``llm.compile(backend="native")``) is the other way to a fast step, with nothing
to compile: for the Llama family it runs each whole decode step in one C++ call
(:mod:`lucidlm.model.native`), and any other model eagerly.

>>> from lucidlm import Config, GPT
>>> decoder = CompiledDecoder(GPT(Config.from_name("tiny-llama")))
>>> decoder.capacity(300, block_size=2048)
512
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch

from .cache.base import KVCache
from .generate import decode_step
from .model.linear import kernel_ready

#: static cache capacities are multiples of this many tokens (fewer distinct graphs to compile)
CAPACITY_STEP = 256


class CompileFallback(UserWarning):
    """``torch.compile`` could not be used; decoding runs eagerly (same results, slower)."""


def missing_compiler(device: torch.device) -> str | None:
    """Why TorchInductor cannot compile on ``device`` here, or ``None`` when it can try."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if not any(shutil.which(c) for c in (cxx, "g++", "c++", "clang++")):
            return "no C++ compiler found (TorchInductor needs g++ or clang++ on the CPU; Debian: apt-get install g++)"
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (TorchInductor's GPU backend)"
    return None


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Storage, dtype and in-place version counter of every parameter and buffer (int8 and GGUF
    weights are buffers): equal as long as no weight changed."""
    return tuple((t.data_ptr(), t.dtype, t._version) for t in [*model.parameters(), *model.buffers()])


class CompiledDecoder:
    """One-token decode steps of ``model`` through ``torch.compile``, over a static dense cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        from .model.parallel import shard_of

        if shard_of(model) is not None:  # fullgraph=True: the all-reduce of each block would break it
            from .errors import ParallelError

            raise ParallelError("compile() / --compile: a tensor-parallel model decodes eagerly (its all-reduces "
                                "are not compiled); drop --compile")
        self.model = model
        self.fallback_reason: str | None = None
        self._weights: tuple | None = None  # fingerprint of the weights the graphs were compiled with
        self._compiled = None

    def _compile_for_current_weights(self) -> None:
        weights = weights_fingerprint(self.model)
        if weights != self._weights:
            if self._compiled is not None:
                torch.compiler.reset()  # graphs hold frozen copies of the old weights
            model = self.model

            def step(token, positions, cache):  # a closure over the module: its weights freeze
                return decode_step(token, positions, cache, model)

            self._compiled = torch.compile(step, dynamic=False, fullgraph=True)
            self._weights = weights

    def capacity(self, needed: int, block_size: int) -> int:
        """The static cache size for ``needed`` tokens: rounded up to :data:`CAPACITY_STEP`, at most
        the context length."""
        return min(block_size, -(-needed // CAPACITY_STEP) * CAPACITY_STEP)

    def prepare(self, cache: KVCache) -> bool:
        """Switch a prefilled dense cache to fixed shapes. False (and decode eagerly) when it is not
        dense or no compiler is available."""
        from .cache.base import DenseLayerCache

        if self.fallback_reason is None:
            device = next(self.model.parameters()).device
            self.fallback_reason = missing_compiler(device)
            if self.fallback_reason is not None:
                warnings.warn(f"torch.compile unavailable, decoding eagerly: {self.fallback_reason}",
                              CompileFallback, stacklevel=3)
        if self.fallback_reason is not None or not all(isinstance(layer, DenseLayerCache) for layer in cache.layers):
            return False
        if (self.model.config.rope_scaling or {}).get("rope_type") == "dynamic":
            return False  # dynamic NTK reads each step's length on the host (transformers' state): eager

        kernel_ready()  # build/load the CPU kernel now: inside a graph being traced it could not
        self._compile_for_current_weights()
        for layer in cache.layers:
            layer.make_static()
        return True

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, cache: KVCache, model=None) -> torch.Tensor:
        """Last logits (batch, vocab) for ``token`` (batch, 1) at ``positions`` (batch, 1). (``model``:
        ignored, the decoder's own; there for the same call as generation's eager step.)"""
        if self.fallback_reason is None:
            try:
                from torch._inductor import config as inductor_config

                # freezing is read from Inductor's config when a graph compiles (torch.compile's
                # options= does not reach it); patched for the call only, restored after
                with inductor_config.patch(freezing=True):
                    return self._compiled(token, positions, cache)
            except Exception as exc:  # a compiler error of any kind: the eager step computes the same
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                warnings.warn(f"torch.compile failed, decoding eagerly: {self.fallback_reason}",
                              CompileFallback, stacklevel=2)
        return decode_step(token, positions, cache, self.model)


class NativeDecoder:
    """Decode steps in lucidlm's native decoder (:mod:`lucidlm.model.native`): the whole step in one
    C++ call per token, no graph to compile. It covers the Llama family (SmolLM2, Llama, Mistral
    without a window, Qwen2) in float32 activations with float32, int8 or GGUF Q8_0/Q4_0/Q4_1 weights
    over a dense cache; any other model, cache or setting decodes eagerly, silently, with the same
    tokens (:attr:`reason` says why the last generation did).

    >>> from lucidlm import Config, GPT
    >>> from lucidlm.generate import generate_ids
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> decoder = NativeDecoder(model)
    >>> steps = list(generate_ids(model, [[1, 2, 3]], max_new_tokens=4, decoder=decoder))
    >>> steps == list(generate_ids(model, [[1, 2, 3]], max_new_tokens=4))
    True
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.reason = ""  # why the last prepare() left the steps to the eager path ("": native)
        self._plan = None
        self._weights: tuple | None = None  # fingerprint of the weights the plan holds
        self._cache = None  # the cache prepare() accepted

    def capacity(self, needed: int, block_size: int) -> int:
        """The dense cache size for ``needed`` tokens (exactly that: no shapes are fixed)."""
        return min(block_size, needed)

    def prepare(self, cache: KVCache) -> bool:
        """Whether the steps on this prefilled ``cache`` run natively (else eagerly, :attr:`reason`)."""
        from .model import native

        weights = weights_fingerprint(self.model)
        if weights != self._weights:  # new or changed weights (fine-tuning, quantize()): plan again
            self._plan, self._weights = native.plan(self.model), weights
        fits = native.fits(cache)
        self.reason = self._plan.reason or ("" if fits else "the cache is not a dense float32 one on the CPU")
        self._cache = cache if not self.reason else None
        return not self.reason

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, cache: KVCache, model=None) -> torch.Tensor:
        """Last logits (batch, vocab), as the eager :func:`~lucidlm.generate.decode_step`."""
        from .model import native

        first = cache.layers[0] if cache is self._cache else None
        if first is not None and first.filled < first.capacity and token.shape[0] == first.k.shape[0]:
            return native.step(self._plan, token, positions, cache)
        return decode_step(token, positions, cache, self.model)

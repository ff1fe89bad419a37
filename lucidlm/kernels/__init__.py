"""lucidlm's native CPU kernels: C++ sources and their build, below the model that calls them.

* ``gemv.cpp``: ``torch.ops.lucidlm_kernels.gemv``, one row of activations times a weight matrix
  (the decode step's products), used by :class:`lucidlm.model.linear.Linear`.
* ``qgemv.cpp``: ``q8_gemv`` / ``q4_gemv``, the same products reading 8-bit (per-channel int8, GGUF Q8_0)
  and 4-bit (Q4_0 / Q4_1) blocks as they are stored, used by :mod:`lucidlm.model.qlinear`.
* :mod:`lucidlm.kernels.build`: compiles them (one library) once per machine into the cache
  (:func:`lucidlm.fileio.cache_root`), loads it, and says whether it is ready.
"""

from __future__ import annotations

from .build import ENV_VAR, KernelUnavailable, kernel_ready, library_path

__all__ = ["ENV_VAR", "KernelUnavailable", "kernel_ready", "library_path"]

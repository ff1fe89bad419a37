"""lucidlm's native CPU kernels: C++ sources and their build, below the model that calls them.

* ``gemv.cpp``: ``torch.ops.lucidlm_kernels.gemv``, one row of activations times a weight matrix
  (the decode step's products), used by :class:`lucidlm.model.linear.Linear`.
* :mod:`lucidlm.kernels.build`: compiles it once per machine into the cache
  (:func:`lucidlm.fileio.cache_root`), loads it, and says whether it is ready.
"""

from __future__ import annotations

from .build import ENV_VAR, KernelUnavailable, kernel_ready, library_path

__all__ = ["ENV_VAR", "KernelUnavailable", "kernel_ready", "library_path"]

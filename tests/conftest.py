import pathlib
import sys

import pytest

from lucidlm.checkpoints.embedded import default_model_path
from lucidlm.checkpoints.gguf import gguf_to_hf_dir
from lucidlm.tokenizer import Tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from families import FAMILIES, build_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (transformers model, directory it was saved to); built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = build_hf_model(family)
            directory = tmp_path_factory.mktemp(family)
            model.save_pretrained(directory, safe_serialization=True)
            cache[family] = (model, directory)
        return cache[family]

    return get


ALL_FAMILIES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The embedded GGUF converted once into a cache shared by the test modules of this run."""
    cache = tmp_path_factory.getbasetemp() / "lucidlm-cache"
    return gguf_to_hf_dir(default_model_path(), cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def ours(converted):
    """lucidlm's tokenizer of the embedded model."""
    return Tokenizer.from_dir(converted)


@pytest.fixture(scope="module")
def oracle():
    """transformers' tokenizer read straight from the same GGUF (the independent oracle)."""
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

import pathlib
import sys

import pytest

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

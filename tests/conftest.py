import os
import pathlib
import signal
import sys

import pytest

from lucidlm.checkpoints.embedded import default_model_path
from lucidlm.checkpoints.gguf import gguf_to_hf_dir
from lucidlm.tokenizer import Tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from families import FAMILIES, build_hf_model  # noqa: E402
import strict_skips  # noqa: E402


#: fixtures that load the real embedded model (or convert its GGUF): their tests are marked slow
_REAL_MODEL_FIXTURES = {"converted", "ours", "oracle", "smollm2", "oracle_model"}
#: modules whose own fixtures load the real model through LLM.load()
_REAL_MODEL_MODULES = {"test_generate", "test_serve", "test_dtypes", "test_target_hint", "test_cache_policies",
                       "test_viewer_browser", "test_repl", "test_cli", "test_faithfulness", "test_lora_interop",
                       "test_lxt_reference", "test_fuzz"}


def pytest_configure(config):
    """CI (``.ci/run``) sets $LUCIDLM_STRICT_SKIPS: a skip for a missing dependency or tool is then an
    error (see ``tests/strict_skips.py``)."""
    strict_skips.register(config)
    # the Ctrl-C tests (test_repl, test_train_interrupt) need SIGINT delivered: a suite started in the
    # background by a non-interactive shell (`cmd &`) inherits it ignored, and so would every process it starts
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """Mark the tests that need the real model or a subprocess CLI run ``slow``: ``pytest -m "not
    slow"`` is the fast subset for development; CI runs everything."""
    for item in items:
        module = getattr(item, "module", None)  # doctest items have none
        module = module.__name__.rpartition(".")[2] if module else ""
        if _REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or module in _REAL_MODEL_MODULES:
            item.add_marker(pytest.mark.slow)


def _conversion_cache(tmp_path_factory) -> pathlib.Path:
    """The GGUF conversion cache of the test runs: under pytest's own temporary root
    (/tmp/pytest-of-USER), shared by the xdist workers and by later runs, never ~/.cache/lucidlm.
    The cache is content-keyed and written atomically, so workers converting at once are safe."""
    base = tmp_path_factory.getbasetemp()
    root = next((p for p in (base, *base.parents) if p.name.startswith("pytest-of-")), base)
    return root / "lucidlm-conversion-cache"


@pytest.fixture(scope="session", autouse=True)
def temp_conversion_cache(tmp_path_factory):
    """Every test (and every CLI subprocess it starts) converts GGUF files into the temporary
    cache: ``LLM.load()`` without ``cache_dir`` reads $LUCIDLM_CACHE."""
    from lucidlm.checkpoints.conversion_cache import ENV_VAR

    cache = _conversion_cache(tmp_path_factory)
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = previous


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


@pytest.fixture(scope="session")
def converted(temp_conversion_cache):
    """The embedded GGUF converted once (per session; reused from the temporary cache)."""
    return gguf_to_hf_dir(default_model_path(), cache_dir=temp_conversion_cache, progress=False)


@pytest.fixture(scope="session")
def smollm2(temp_conversion_cache):
    """The embedded SmolLM2-135M-Instruct as an LLM in eval mode, loaded once per session: tests
    must not change its weights or dtype (copy it first)."""
    import lucidlm
    from lucidlm.errors import ModelNotInstalledError

    try:
        llm = lucidlm.LLM.load()
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    llm.model.eval()
    return llm


@pytest.fixture(scope="session")
def ours(converted):
    """lucidlm's tokenizer of the embedded model."""
    return Tokenizer.from_dir(converted)


@pytest.fixture(scope="session")
def oracle():
    """transformers' tokenizer read straight from the same GGUF (the independent oracle)."""
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def build_tiny_lm(directory, converted_dir, seed: int = 0, n_layer: int = 2, tied: bool = True):
    """A tiny random Llama (``n_layer`` layers, width 32) with the embedded model's real tokenizer, saved
    by transformers: fast to train, and every path that needs text works on it."""
    import torch
    import transformers as T

    from lucidlm.checkpoints.hf import copy_tokenizer_files

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    T.LlamaForCausalLM(config).save_pretrained(directory)
    copy_tokenizer_files(converted_dir, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, converted):
    """Directory of :func:`build_tiny_lm` (built once per session)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), converted)


@pytest.fixture
def model_file(tmp_path):
    """An existing file given as a model: argument errors must exit before it is opened."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


#: LitGPT 0.5.13 and its imports, installed apart by scripts/test.sh (it pins huggingface_hub<1.4)
LITGPT_DIR = pathlib.Path(__file__).resolve().parent.parent / ".venv-litgpt"


@pytest.fixture(scope="session")
def litgpt():
    """The ``litgpt`` package (0.5.13) from ``.venv-litgpt``: its folder goes at the *end* of
    ``sys.path``, so that the suite's own transformers/huggingface_hub stay the ones imported."""
    if not (LITGPT_DIR / "litgpt").is_dir():
        pytest.skip(f"litgpt 0.5.13 is not installed in {LITGPT_DIR} (scripts/test.sh's setup_venv puts it there)")
    if str(LITGPT_DIR) not in sys.path:
        sys.path.append(str(LITGPT_DIR))
    import litgpt
    import litgpt.adapter
    import litgpt.adapter_v2
    import litgpt.scripts.convert_hf_checkpoint

    version = getattr(litgpt, "__version__", None)
    from importlib.metadata import version as installed

    try:
        version = installed("litgpt")
    except Exception:  # the folder's dist-info is not on the metadata path: read it from the folder
        found = sorted(LITGPT_DIR.glob("litgpt-*.dist-info"))
        version = found[0].name.split("-")[1] if found else version
    assert version == "0.5.13", f"the oracle is LitGPT 0.5.13, found {version}"
    return litgpt

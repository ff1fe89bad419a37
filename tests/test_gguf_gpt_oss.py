"""gpt-oss GGUF files (llama.cpp's ``gpt-oss`` architecture) -> lucidlm.

transformers 5.25's GGUF reader cannot be the oracle here: it fails on llama.cpp's gpt-oss files (a
TypeError reading ``rope.scaling.type``) and names the experts one by one, where ``GptOssForCausalLM``
stacks them. So the oracle is the transformers model that llama.cpp's own converter
(``convert_hf_to_gguf.py``, run through tests/llamacpp_driver.py as in tests/test_gguf_export_llamacpp.py)
turned into the file: ``LLM.load(file)`` must compute its logits, and its greedy tokens through the
KV cache must be transformers' ``generate``'s.

Two files: one in F32, and one converted from a checkpoint whose experts are MXFP4 blocks (as
openai/gpt-oss-20b ships them), which the converter keeps as ggml's MXFP4; that file's oracle holds
the experts transformers' own MXFP4 dequantiser makes of the same bytes.

Export: lucidlm's GGUF of the source checkpoint (F32 and Q8_0) must hold what llama.cpp's converter
wrote (tests/test_gguf_export_llamacpp.py's standard), and settings llama.cpp does not run are refused.

The tiny config is tests/families.py's "gpt-oss" (head size 24, a window of 4 on layers 0 and 2,
YaRN, 4 experts top-2) with SmolLM2's vocabulary, and the SwiGLU limit llama.cpp hard-codes (7.0,
where the shared tests use 0.08); the experts' gate/up weights are scaled so the clamp still bites.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from families import FAMILIES
from lucidlm import LLM
from lucidlm.checkpoints.gguf import gguf_to_hf_dir
from lucidlm.checkpoints.gguf.gpt_oss import SWIGLU_LIMIT, gpt_oss_config
from lucidlm.checkpoints.gguf.reader import Keys
from lucidlm.errors import GGUFError
from lucidlm.generate import generate_ids

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_families_dense import hf_greedy  # noqa: E402 - after the importorskips
from gguf_compare import differences  # noqa: E402
from test_gguf_export_llamacpp import CONVERTER_ENV, PATH_GUESSED_KEYS, ROOT, _SPECIAL, converter_dir  # noqa: E402
from test_gpt_oss import _mxfp4  # noqa: E402

ARCHITECTURES = ("gpt-oss",)  # the GGUF architectures this module reads (tests/test_gguf_families.py counts them)
IDS = torch.tensor([[1, 5, 17, 42, 9, 3, 60, 11, 88, 20, 300, 7]])  # 12 tokens: past the window of 4
GATE_UP_SCALE = 20.0  # gate/up pre-activations of a few units: beyond the limit of 7 on both sides
EXPONENT_SHIFT = 6  # MXFP4 gate/up scales 2^-3..2^1 (test_gpt_oss's are 2^-9..2^-5): the clamp bites there too


def _source_model():
    """The tiny gpt-oss as llama.cpp runs it: SmolLM2's vocabulary, SwiGLU limit 7, every weight perturbed."""
    base = FAMILIES["gpt-oss"]()
    config = type(base).from_dict({**base.to_dict(), **_SPECIAL, "swiglu_limit": SWIGLU_LIMIT})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(GATE_UP_SCALE)
    return model.eval()


def _with_mxfp4_experts(model, directory):
    """Save ``model`` with MXFP4 experts (blocks and scales, as openai/gpt-oss-20b), and give ``model``
    the experts transformers' dequantiser makes of them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model.save_pretrained(directory)
    state = safetensors_torch.load_file(directory / "model.safetensors")
    c = model.config
    for i, layer in enumerate(model.model.layers):
        for j, (name, rows, cols) in enumerate((("gate_up_proj", 2 * c.intermediate_size, c.hidden_size),
                                                ("down_proj", c.hidden_size, c.intermediate_size))):
            blocks, scales = _mxfp4((c.num_local_experts, rows, cols), seed=10 * i + j)
            scales = scales + (EXPONENT_SHIFT if name == "gate_up_proj" else 0)
            with torch.no_grad():
                getattr(layer.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            key = f"model.layers.{i}.mlp.experts.{name}"
            del state[key]
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
    safetensors_torch.save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (directory / "config.json").write_text(json.dumps(config))


def require_converter() -> pathlib.Path:
    """llama.cpp's converter folder; skips the test, naming what is missing, without it."""
    folder = converter_dir()
    if folder is None:
        pytest.skip(f"llama.cpp's converter is not in {ROOT / '.llamacpp-convert'} or ${CONVERTER_ENV}: run "
                    "scripts/fetch_llamacpp_convert.py")
    return folder


def llamacpp_convert(directories: dict[str, pathlib.Path], out: pathlib.Path,
                     types: dict[str, str] | None = None) -> dict[str, pathlib.Path]:
    """name -> llama.cpp's GGUF of each transformers checkpoint directory (of ``--outtype`` ``types[name]``,
    default f32), converted in one process (fails with the converter's traceback)."""
    folder = require_converter()
    files = {name: out / f"{name}.gguf" for name in directories}
    kinds = {name: (types or {}).get(name, "f32") for name in directories}
    jobs = [str(a) for name, directory in directories.items() for a in (directory, files[name], kinds[name])]
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "llamacpp_driver.py"), str(folder), *jobs],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    for path in files.values():
        error = path.with_name(path.name + ".error")
        assert not error.exists(), error.read_text()
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory, converted):
    """kind -> (transformers model, llama.cpp's GGUF of it): "f32", "mxfp4" (its experts) and "q8_0" (the f32
    model as llama.cpp's q8_0), converted in one process."""
    from lucidlm.checkpoints.hf import copy_tokenizer_files

    require_converter()  # before building the models
    root = tmp_path_factory.mktemp("gpt-oss-gguf")
    models, directories = {}, {}
    for kind in ("f32", "mxfp4"):
        models[kind], directories[kind] = _source_model(), root / kind
        if kind == "mxfp4":
            _with_mxfp4_experts(models[kind], directories[kind])
        else:
            models[kind].save_pretrained(directories[kind])
        copy_tokenizer_files(converted, directories[kind])
    directories["q8_0"] = directories["f32"]  # the export's other type, compared below
    paths = llamacpp_convert(directories, root, types={"q8_0": "q8_0"})
    return {kind: (models[kind if kind != "q8_0" else "f32"], paths[kind]) for kind in directories}


def _expert_types(path) -> set[str]:
    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if "_exps.weight" in t.name}


def test_the_files_are_what_llamacpp_writes_for_gpt_oss(files):
    """The cases test what they claim: llama.cpp's gpt-oss layout, the experts in F32 and in MXFP4."""
    assert _expert_types(files["f32"][1]) == {"F32"}
    assert _expert_types(files["mxfp4"][1]) == {"MXFP4"}
    reader = gguf.GGUFReader(files["f32"][1])
    assert reader.get_field("general.architecture").contents() == "gpt-oss"
    assert {"blk.0.attn_sinks.weight", "blk.0.ffn_gate_exps.bias", "blk.0.ffn_up_exps.weight"} <= {
        t.name for t in reader.tensors}


@pytest.mark.parametrize("kind", ["f32", "mxfp4"])
def test_logits_equal_source_model(files, kind, tmp_path):
    model, path = files[kind]
    with torch.no_grad():
        expected = model(IDS).logits
        got = LLM.load(path, cache_dir=tmp_path).model(IDS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the clamp bites: the same weights without it compute something else
    assert (got - expected).abs().max() < 1e-4 < _unclamped_difference(model)


def _unclamped_difference(model) -> float:
    limits = [layer.mlp.experts.limit for layer in model.model.layers]
    try:
        for layer in model.model.layers:
            layer.mlp.experts.limit = float("inf")
        with torch.no_grad():
            unclamped = model(IDS).logits
    finally:
        for layer, limit in zip(model.model.layers, limits):
            layer.mlp.experts.limit = limit
    with torch.no_grad():
        return (unclamped - model(IDS).logits).abs().max().item()


def test_config_is_the_source_models(files, tmp_path):
    """The config.json read from the file: every field GptOssForCausalLM reads, as the source has it."""
    model, path = files["f32"]
    ours = json.loads((gguf_to_hf_dir(path, cache_dir=tmp_path, progress=False) / "config.json").read_text())
    source = model.config.to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window", "layer_types",
                "swiglu_limit", "swiglu_alpha", "attention_bias", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings"):
        assert ours[key] == source[key], key
    assert ours["rope_parameters"] == pytest.approx(source["rope_parameters"])
    assert ours["rms_norm_eps"] == pytest.approx(source["rms_norm_eps"])


def test_cached_greedy_tokens_equal_transformers_generate(files, tmp_path):
    model, path = files["f32"]
    prompt = IDS[0, :6].tolist()
    ours = [step[0] for step in generate_ids(LLM.load(path, cache_dir=tmp_path).model, [prompt], 10)]
    assert ours == hf_greedy(model, prompt, 10)


# ----------------------------------------------------------------------------- bad metadata

_META = {"general.architecture": "gpt-oss", "gpt-oss.embedding_length": 64, "gpt-oss.block_count": 3,
         "gpt-oss.attention.head_count": 4, "gpt-oss.context_length": 128, "gpt-oss.expert_count": 4,
         "gpt-oss.expert_used_count": 2, "gpt-oss.expert_feed_forward_length": 32,
         "gpt-oss.attention.sliding_window": 4}


@pytest.mark.parametrize("extra, key", [
    ({"gpt-oss.rope.scaling.type": "linear", "gpt-oss.rope.scaling.factor": 2.0}, "gpt-oss.rope.scaling.type"),
    ({"gpt-oss.rope.freq_base_swa": 5.0}, "gpt-oss.rope.freq_base_swa"),
    ({"gpt-oss.attention.sliding_window_pattern": -1}, "gpt-oss.attention.sliding_window_pattern"),
    ({"gpt-oss.rope.scaling.type": "yarn", "gpt-oss.rope.scaling.factor": 2.0,
      "gpt-oss.rope.scaling.original_context_length": 64, "gpt-oss.rope.scaling.yarn_ext_factor": 0.5},
     "gpt-oss.rope.scaling.yarn_ext_factor"),
])
def test_metadata_lucidlm_cannot_run_is_a_gguf_error_naming_the_key(extra, key):
    with pytest.raises(GGUFError, match=key.replace(".", r"\.")):
        gpt_oss_config(Keys(_META | extra, "tiny.gguf"), frozenset())


def test_missing_window_is_a_gguf_error_naming_the_key():
    meta = {k: v for k, v in _META.items() if k != "gpt-oss.attention.sliding_window"}
    with pytest.raises(GGUFError, match=r"gpt-oss\.attention\.sliding_window"):
        gpt_oss_config(Keys(meta, "tiny.gguf"), frozenset())


@pytest.mark.parametrize("period, expected", [(2, "SFS"), (3, "SSF"), (0, "SSS"), (1, "FFF")])
def test_layer_pattern_is_llamacpps(period, expected):
    """llama.cpp's ``set_swa_pattern``: of every ``period`` layers all but the last slide (0: all slide)."""
    meta = _META | {"gpt-oss.attention.sliding_window_pattern": period}
    types = gpt_oss_config(Keys(meta, "tiny.gguf"), frozenset())["layer_types"]
    assert "".join(t[0].upper() for t in types) == expected


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_export_equals_llamacpps_conversion(files, kind, tmp_path):
    """lucidlm's export of the source checkpoint holds what llama.cpp's converter wrote (tensors, metadata:
    tests/test_gguf_export_llamacpp.py's standard), and its F32 export reads back to the source's logits."""
    model, path = files["f32"]
    ours = LLM.load(path.with_suffix("")).export_gguf(tmp_path / "ours.gguf", type=kind)
    assert differences(ours, files[kind][1], ignored_keys=PATH_GUESSED_KEYS) == []
    if kind != "f32":
        return
    with torch.no_grad():
        torch.testing.assert_close(LLM.load(ours, cache_dir=tmp_path / "cache").model(IDS), model(IDS).logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, match", [({"swiglu_limit": 0.08}, "swiglu_limit=0.08"),
                                           ({"layer_types": ["full_attention"] * 3}, "layer_types"),
                                           ({"rope_parameters": dict(rope_type="yarn", factor=8.0, truncate=True,
                                                                     original_max_position_embeddings=16)}, "truncate")])
def test_export_refuses_what_llamacpp_does_not_run(files, change, match, tmp_path):
    from lucidlm.errors import ExportError

    llm = LLM.load(files["f32"][1], cache_dir=tmp_path / "cache")
    llm.model.config.hf_config = {**llm.model.config.hf_config, **change}
    with pytest.raises(ExportError, match=match):
        llm.export_gguf(tmp_path / "out.gguf", type="f32")
    assert not (tmp_path / "out.gguf").exists()


# ----------------------------------------------------------------------------- the o200k split

TEXTS = ["HelloWorld, it's JSONParser's 1234567 dollars", "don'T/path/to\nfile  \n\n  x", "Ünïcödé ÀBCdéf 12 345",
         "a\r\n\tb   c", "CamelCase's UPPERcase lowerCASE"]


def _tokenizer_gguf(path, converted_meta: dict, pre: str):
    """A GGUF holding SmolLM2's byte-level vocabulary under ``tokenizer.ggml.pre`` = ``pre`` (and no tensors)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(converted_meta["tokenizer.ggml.tokens"])
    writer.add_token_types(converted_meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(converted_meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gpt_oss_split_equals_transformers_gguf_tokenizer(tmp_path):
    """Published gpt-oss GGUFs say ``tokenizer.ggml.pre`` "gpt-4o" (the o200k split): lucidlm tokenizes as
    transformers' GGUF tokenizer does for it, which differs from GPT-2's split on these texts."""
    from lucidlm.checkpoints.embedded import default_model_path
    from lucidlm.checkpoints.gguf import read_metadata
    from lucidlm.checkpoints.gguf.tokenizer import build_tokenizer

    source = read_metadata(default_model_path())
    encoded = {}
    for pre in ("gpt-4o", "smollm"):
        path = _tokenizer_gguf(tmp_path / f"{pre}.gguf", source, pre)
        ours = build_tokenizer(read_metadata(path), path)
        theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        encoded[pre] = [ours.encode(text, add_special_tokens=False).ids for text in TEXTS]
        assert encoded[pre] == [theirs.encode(text, add_special_tokens=False) for text in TEXTS]
    assert encoded["gpt-4o"] != encoded["smollm"]


# ----------------------------------------------------------------------------- a published file's header

# ggml-org/gpt-oss-20b-GGUF (gpt-oss-20b-mxfp4.gguf): its gpt-oss.* keys as llama.cpp's loader lists them
# (llama_model_loader's metadata dump); float32 values as the file stores them
PUBLISHED_20B = {
    "gpt-oss.block_count": 24, "gpt-oss.context_length": 131072, "gpt-oss.embedding_length": 2880,
    "gpt-oss.feed_forward_length": 2880, "gpt-oss.attention.head_count": 64, "gpt-oss.attention.head_count_kv": 8,
    "gpt-oss.rope.freq_base": 150000.0, "gpt-oss.attention.layer_norm_rms_epsilon": 1e-05,
    "gpt-oss.expert_count": 32, "gpt-oss.expert_used_count": 4, "gpt-oss.attention.key_length": 64,
    "gpt-oss.attention.value_length": 64, "gpt-oss.attention.sliding_window": 128,
    "gpt-oss.expert_feed_forward_length": 2880, "gpt-oss.rope.scaling.type": "yarn", "gpt-oss.rope.scaling.factor": 32.0,
    "gpt-oss.rope.scaling.original_context_length": 4096,
}


def published_config_differences(meta: dict, vocab: int, catalogue_name: str) -> list[str]:
    """The lucidlm Config fields that differ between a published GGUF's metadata (its floats as float32, as the
    file stores them) and the checkpoint's published config.json (the catalogue's copy); floats to float32's
    precision."""
    import dataclasses

    import numpy as np

    from lucidlm import Config
    from lucidlm.checkpoints import gguf as lgguf

    meta = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in meta.items()}
    meta |= {"tokenizer.ggml.tokens": [""] * vocab}
    hf = lgguf._hf_config(meta, ["output.weight", "token_embd.weight"], torch.float32)
    ours, published = (dataclasses.asdict(c) for c in (Config.from_hf(hf), Config.from_name(catalogue_name)))
    return [k for k in ours if k not in ("name", "hf_config") and not _close(ours[k], published[k])]


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == pytest.approx(b, rel=1e-6)
    return a == b


def test_published_gguf_header_reads_as_the_published_config():
    """The header of ggml-org's gpt-oss-20b GGUF gives the model openai/gpt-oss-20b's config.json describes
    (the catalogue's copy): every lucidlm Config field."""
    assert published_config_differences({"general.architecture": "gpt-oss", **PUBLISHED_20B}, 201088,
                                        "gpt-oss-20b") == []

"""GGUF export (``LLM.export_gguf``, ``lucidlm export``) against independent readers.

Each family's tiny random transformers model (the cases of ``tests/test_gguf_families.py``, whose
settings llama.cpp can express) is saved with a small byte-level BPE tokenizer, loaded by lucidlm
and exported. The oracle is transformers' own GGUF reader (``from_pretrained(dir, gguf_file=...)``):
its model's logits equal the source model's for F32 files, and for F16/BF16/Q8_0/Q4_0 files they
equal those of the source model with each matrix rounded by the ``gguf`` package's own quantisers
(so the tolerance is the float32 noise, not the quantisation error). Where transformers' reader
cannot rebuild the family (``oracle_gap``) lucidlm's reader is checked against the source model.
"""

from __future__ import annotations

import copy
import json
import re
import pathlib

import numpy as np
import pytest
import torch

from lucidlm import LLM
from lucidlm.checkpoints.gguf import read_metadata
from lucidlm.cli import main
from lucidlm.errors import ExportError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")

from test_gguf_families import CASES, IDS, TOL, build_model  # noqa: E402

TEXTS = ["Hello world", "the quick brown fox jumps over the lazy dog.", "  spaces\tand\nlines  ",
         "<|im_start|>user\nhi<|im_end|>", "café über", "x"]


# ----------------------------------------------------------------------------- sources


def _tiny_tokenizer(directory: pathlib.Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens: 3 specials, characters, one merge."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(ord("!"), ord("!") + vocab_size - 4)]
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *chars, "he"])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast",
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """case id -> (transformers model, its saved directory with a tokenizer), built once."""
    made = {}

    def get(case_id: str):
        if case_id not in made:
            model = build_model(CASES[case_id])
            directory = tmp_path_factory.mktemp(case_id)
            model.save_pretrained(directory)
            _tiny_tokenizer(directory, model.config.vocab_size)
            made[case_id] = model, directory
        return made[case_id]

    return get


def _export(directory: pathlib.Path, out: pathlib.Path, kind: str) -> pathlib.Path:
    return LLM.load(directory).export_gguf(out, type=kind)


def _transformers(path: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def _rounded(model, kind: str):
    """``model`` with every matrix rounded as a ``kind`` file stores it (the gguf package's quantisers;
    norms, biases and 1-D tensors stay float32, as in the file)."""
    from gguf.quants import dequantize, quantize

    qtype = gguf.GGMLQuantizationType[kind.upper()]
    model = copy.deepcopy(model)
    # GPT-2's Conv1D stores (in, out): the file's blocks run along the input, so round the transpose
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "norm" not in name and kind != "f32":
                array = (p.t() if name in conv1d else p).detach().contiguous().numpy().astype(np.float32)
                rounded = torch.from_numpy(dequantize(quantize(array, qtype), qtype).reshape(array.shape))
                p.copy_(rounded.t() if name in conv1d else rounded)
    return model


# ----------------------------------------------------------------------------- every family, F32


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_f32_export_equals_the_source(case_id, source, tmp_path):
    model, directory = source(case_id)
    out = _export(directory, tmp_path / f"{case_id}.gguf", "f32")
    assert read_metadata(out)["general.architecture"] == CASES[case_id].arch
    with torch.no_grad():
        expected = model(IDS).logits
        torch.testing.assert_close(LLM.load(out, cache_dir=tmp_path / "cache").model(IDS), expected, **TOL)
        if CASES[case_id].oracle_gap is None:
            torch.testing.assert_close(_transformers(out)(IDS).logits, expected, **TOL)


@pytest.mark.parametrize("case_id", ["llama2", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0"])
def test_rounded_export_equals_the_source_rounded_alike(case_id, kind, source, tmp_path):
    model, directory = source(case_id)
    out = _export(directory, tmp_path / f"{case_id}-{kind}.gguf", kind)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_output.weight"] == kind.upper()
    assert all(types[n] == "F32" for n in types if n.endswith(("norm.weight", ".bias")))
    if kind == "bf16" or (case_id == "gpt2"):  # transformers' reader lacks BF16; GPT-2 keeps position_embd F32
        oracle = LLM.load(out, cache_dir=tmp_path / "cache").model
    else:
        oracle = _transformers(out)
    reference = _rounded(model, kind)
    if case_id == "gpt2":
        with torch.no_grad():  # llama.cpp keeps GPT-2's position table in F32
            reference.transformer.wpe.weight.copy_(model.transformer.wpe.weight)
    with torch.no_grad():
        logits = oracle(IDS)
        logits = logits.logits if hasattr(logits, "logits") else logits
        torch.testing.assert_close(logits, reference(IDS).logits, **TOL)


def test_quantised_files_are_smaller(source, tmp_path):
    _, directory = source("llama2")
    sizes = {k: _export(directory, tmp_path / f"{k}.gguf", k).stat().st_size for k in ("f32", "f16", "q8_0", "q4_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


# ----------------------------------------------------------------------------- tokenizer and metadata


def _assert_tokenizer_round_trips(source_dir: pathlib.Path, out: pathlib.Path, tmp_path: pathlib.Path) -> None:
    expected = transformers.AutoTokenizer.from_pretrained(str(source_dir))
    oracle = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    ours = LLM.load(out, cache_dir=tmp_path / "cache").tokenizer
    for text in TEXTS:
        ids = expected.encode(text)
        assert oracle.encode(text) == ids, text
        assert ours.encode(text) == ids, text


def test_byte_level_bpe_round_trips(tiny_lm_dir, tmp_path):
    out = _export(tiny_lm_dir, tmp_path / "bpe.gguf", "f32")
    meta = read_metadata(out)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"]
    assert meta["tokenizer.chat_template"] == LLM.load(tiny_lm_dir).tokenizer.chat_template
    _assert_tokenizer_round_trips(tiny_lm_dir, out, tmp_path)


def test_sentencepiece_round_trips(tmp_path):
    from lucidlm.checkpoints.gguf.tokenizer import build_tokenizer
    from test_gguf_spm import TEXTS as SPM_TEXTS, write_spm_gguf  # a SentencePiece GGUF, llama.cpp's way

    spm = write_spm_gguf(tmp_path / "spm.gguf")
    llm = LLM.load(spm, cache_dir=tmp_path / "cache0")
    llm.source = None  # export from the HF directory's tokenizer.json, not the GGUF's own keys
    out = llm.export_gguf(tmp_path / "spm-export.gguf", type="f32")
    meta = read_metadata(out)
    assert meta["tokenizer.ggml.model"] == "llama"
    expected = transformers.AutoTokenizer.from_pretrained(str(spm.parent), gguf_file=spm.name)
    oracle = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    # llama.cpp ranks merges by the scores alone: they must imply the same merges
    from_scores = build_tokenizer({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})
    for text in SPM_TEXTS:
        ids = expected.encode(text)
        assert oracle.encode(text) == ids, text
        assert from_scores.encode(text).ids == ids, text


def test_hub_name_goes_into_general_metadata(source, tmp_path):
    _, directory = source("qwen2")
    llm = LLM.load(directory)
    llm.source = "/cache/hub/models--Qwen--Qwen2-0.5B/snapshots/abc"
    meta = read_metadata(llm.export_gguf(tmp_path / "q.gguf", type="f16"))
    assert meta["general.name"] == "Qwen2-0.5B" and meta["general.organization"] == "Qwen"
    assert meta["general.source.repo_url"] == "https://huggingface.co/Qwen/Qwen2-0.5B"
    assert LLM.load(tmp_path / "q.gguf").hub_id == "Qwen/Qwen2-0.5B"  # what an adapter trained on it records
    assert meta["general.file_type"] == 1 and meta["general.quantization_version"] == 2


# ----------------------------------------------------------------------------- refusals, atomicity, CLI


def test_unsupported_family_is_a_typed_error(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("gptj")
    with pytest.raises(ExportError, match=r"'gptj' model cannot be exported.*supported model types: .*llama"):
        LLM.load(directory).export_gguf(tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_is_a_typed_error(source, tmp_path):
    with pytest.raises(ExportError, match="q5_k.*f32, f16, bf16, q8_0, q4_0"):
        LLM.load(source("llama2")[1]).export_gguf(tmp_path / "x.gguf", type="q5_k")


def test_a_failure_mid_write_leaves_no_file(source, tmp_path, monkeypatch):
    import gguf.gguf_writer

    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    llm = LLM.load(source("llama2")[1])

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.gguf_writer.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        llm.export_gguf(out, type="q8_0")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


def test_cli_exports_with_an_adapter_merged(tiny_lm_dir, tmp_path):
    from lucidlm.train.lora import attach_lora, save_adapter

    llm = LLM.load(tiny_lm_dir)
    attach_lora(llm.model, r=2, alpha=4)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(llm.model, tmp_path / "adapter", base_model=str(tiny_lm_dir))
    out = tmp_path / "merged.gguf"
    assert main(["export", str(tiny_lm_dir), str(out), "--type", "f32", "--adapter", str(tmp_path / "adapter")]) == 0
    ids = torch.tensor([[1, 5, 17, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(_transformers(out)(ids).logits, llm.model(ids), **TOL)
    assert main(["export", str(tiny_lm_dir), str(out), "--model", str(tiny_lm_dir)]) == 2


# ----------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_exports_and_reloads(smollm2, tmp_path):
    prompt = "The capital of France is"
    for kind in ("f16", "q8_0"):
        out = smollm2.export_gguf(tmp_path / f"smol-{kind}.gguf", type=kind)
        meta = read_metadata(out)
        assert meta["tokenizer.ggml.pre"] == "smollm" and meta["general.basename"] == "smollm2"
        back = LLM.load(out, cache_dir=tmp_path / "cache")
        ids = torch.tensor([smollm2.tokenizer.encode(prompt)])
        with torch.no_grad():
            diff = (back.model(ids) - smollm2.model(ids)).abs().max().item()
        assert diff < (0.05 if kind == "f16" else 1.0), (kind, diff)
        if kind == "f16":
            assert back.generate(prompt, max_new_tokens=16) == smollm2.generate(prompt, max_new_tokens=16)


def test_rope_freqs_that_are_not_llama3_scaling_are_a_typed_error():
    """A file's per-frequency RoPE factors read back as the Llama 3 config that reproduces them, or refused."""
    from lucidlm.checkpoints.gguf.rope_freqs import llama3_factors, llama3_parameters
    from lucidlm.errors import GGUFError

    params = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=2.0, high_freq_factor=8.0,
                  original_max_position_embeddings=100)
    back = llama3_parameters(llama3_factors(params, 64), 10000.0, 64, "f.gguf")
    torch.testing.assert_close(llama3_factors(back, 64), llama3_factors(params, 64))
    assert llama3_parameters(torch.full((32,), 4.0), 10000.0, 64, "f.gguf")["rope_type"] == "linear"
    with pytest.raises(GGUFError, match="f.gguf: its rope_freqs factors are not Llama 3"):
        llama3_parameters(torch.linspace(1.0, 3.0, 32).flip(0), 10000.0, 64, "f.gguf")


_DECODER = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                intermediate_size=256, max_position_embeddings=128, vocab_size=96)
_LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)


@pytest.mark.parametrize("hf, arch, needle", [
    (dict(_DECODER, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          mlp_only_layers=[1]), "qwen2moe", "dense layers"),
    (dict(_DECODER, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          norm_topk_prob=False), "qwen3moe", "norm_topk_prob=True"),
    (dict(_DECODER, model_type="phi", intermediate_size=96), "phi2", "4 * hidden_size"),
    (dict(_DECODER, model_type="granite", rope_parameters=_LLAMA3), "granite", "'llama3' RoPE scaling"),
    (dict(_DECODER, model_type="cohere", logit_scale=0.5, rope_parameters=dict(rope_type="linear", factor=2.0)),
     "command-r", "'linear' RoPE scaling"),
])
def test_settings_llamacpp_cannot_express_are_typed_errors(hf, arch, needle):
    from lucidlm.checkpoints.gguf.hparams import architecture_keys

    with pytest.raises(ExportError, match=re.escape(needle)):
        architecture_keys(hf, arch)

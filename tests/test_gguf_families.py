"""GGUF -> lucidlm for every family llama.cpp exports that lucidlm's model implements.

Each case builds a tiny random transformers model (``tests/families.py``), writes it to a GGUF file
the way llama.cpp's ``convert_hf_to_gguf.py`` does (its key and tensor names, and what it does to the
weights: Llama's Q/K row permutation, Gemma's ``1 + w`` norms, GPT-2's transposed Conv1D matrices,
StableLM's stacked per-head norms, Falcon's ``query_key_value`` regrouped into ``[q; k; v]``), then checks ``lucidlm.LLM.load(file)`` against:

* transformers reading the same file (``from_pretrained(dir, gguf_file=...)``), the oracle, wherever
  its loader rebuilds the model faithfully; each case where it cannot says why (``oracle_gap``);
* the transformers model the file was written from, always (this covers what that loader drops:
  Qwen3/Gemma ``attention.key_length``, Gemma soft-caps, linear RoPE scaling, Phi-3 partial rotary,
  StableLM per-head norms, Falcon's new decoder architecture, and the ``gemma`` architecture it does
  not read at all).

Mixtral GGUFs are ``llama`` files with expert
tensors; transformers' loader builds a plain Llama for them and lucidlm refuses them by tensor name.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
from typing import Any

import numpy as np
import pytest
import torch

from families import FAMILIES
from lucidlm import LLM
from lucidlm.checkpoints import gguf as lgguf
from lucidlm.checkpoints.gguf import gguf_to_hf_dir
from lucidlm.errors import GGUFError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")

IDS = torch.tensor([[1, 5, 17, 42, 9, 3, 60, 11, 88, 20]])  # longer than the sliding windows below
TOL = dict(atol=1e-4, rtol=1e-4)
# not n_inner: we write GPT-2's feed_forward_length where transformers keeps None (= 4 * n_embd)
CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "max_position_embeddings", "rms_norm_eps", "layer_norm_eps", "tie_word_embeddings",
    "sliding_window", "layer_types", "rope_parameters", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "hidden_act", "hidden_activation", "use_qkv_bias", "use_parallel_residual",
    "qk_layernorm", "n_positions", "layer_norm_epsilon", "activation_function",
    "ffn_hidden_size", "num_kv_heads", "multi_query", "new_decoder_architecture", "parallel_attn", "bias", "alibi",
    "bos_token_id", "eos_token_id", "pad_token_id", "norm_eps",
)  # fmt: skip
# keys transformers' loader sets on a config class whose model never reads them (Falcon reads
# ffn_hidden_size and num_kv_heads)
UNREAD_KEYS = {"FalconConfig": ("intermediate_size", "num_key_value_heads")}
# keys transformers' loader drops and leaves at a default that the file holds only rounded to float32
# (it reads Falcon's eps from layer_norm_rms_epsilon, which llama.cpp does not write for Falcon)
ROUNDED_KEYS = {"FalconConfig": ("layer_norm_epsilon",)}


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # key in tests/families.py
    arch: str  # GGUF general.architecture
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # why transformers' GGUF loader does not rebuild this model (None: it does, and is the oracle)
    oracle_gap: str | None = None
    f16: bool = False  # 2-D tensors in F16, as llama.cpp's --outtype f16
    name: str = "tiny"  # general.name


_DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0)
_GEMMA3_ROPE = {"sliding_attention": _DEFAULT_ROPE, "full_attention": dict(rope_type="default", rope_theta=1e6)}
_GEMMA3_LINEAR = {"sliding_attention": _DEFAULT_ROPE,
                  "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6)}
# llama.cpp knows Gemma 3's layer pattern only as "every 6th layer global"
_GEMMA3_LAYERS = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"])
_GEMMA_SCALE = dict(head_dim=256, query_pre_attn_scalar=256)  # what transformers' loader assumes

_FALCON = dict(ffn_hidden_size=256, max_position_embeddings=2048)
_FALCON_GAP = ("it ignores attn_norm_2 and head_count_kv and builds falcon-7b's multi-query model, which "
               "the grouped (and [q; k; v]-ordered) query_key_value does not fit")

CASES = {
    "llama2": Case("llama2", "llama"),
    # llama.cpp exports Mistral as "llama" and keeps no sliding window (it runs none), so the source
    # model has none either. (transformers maps general.name == "mistral" exactly to a "mistral"
    # architecture that gguf 0.19 does not know, and fails; real files are named "Mistral 7B ...".)
    "mistral": Case("mistral", "llama", dict(sliding_window=None), name="Mistral 7B Instruct v0.3"),
    "qwen2": Case("qwen2", "qwen2"),
    "qwen2-f16": Case("qwen2", "qwen2", f16=True),
    "qwen3": Case("qwen3", "qwen3", dict(head_dim=128)),
    "qwen3-head-dim-24": Case("qwen3", "qwen3", oracle_gap="it ignores attention.key_length (head_dim stays 128)"),
    "phi3": Case("phi3", "phi3"),
    "phi3-partial-rotary": Case("phi3", "phi3", dict(rope_parameters={**_DEFAULT_ROPE, "partial_rotary_factor": 0.5}),
                                oracle_gap="it ignores phi3.rope.dimension_count (partial rotary)"),
    "gemma": Case("gemma", "gemma", oracle_gap="it does not read architecture 'gemma' (only gemma2/gemma3)"),
    "gemma2": Case("gemma2", "gemma2", dict(_GEMMA_SCALE, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma2-softcaps": Case("gemma2", "gemma2", oracle_gap="it ignores key_length and the soft-caps (keeps defaults)"),
    "gemma3": Case("gemma3", "gemma3", dict(_GEMMA3_LAYERS, **_GEMMA_SCALE, rope_parameters=_GEMMA3_ROPE)),
    "gemma3-linear-rope": Case("gemma3", "gemma3", dict(_GEMMA3_LAYERS, rope_parameters=_GEMMA3_LINEAR),
                               oracle_gap="it ignores rope.scaling.* and key_length"),
    "gemma3-no-window": Case("gemma3", "gemma3", dict(_GEMMA_SCALE, layer_types=["full_attention"] * 3),
                             oracle_gap="it makes every 6th layer global even when the file names no window"),
    "stablelm": Case("stablelm", "stablelm"),
    "stablelm-parallel": Case("stablelm-parallel", "stablelm",
                              oracle_gap="it drops the per-head q/k norms (attn_q_norm, attn_k_norm)"),
    # llama.cpp keeps no window for Starcoder2 (and transformers' loader sets none)
    "starcoder2": Case("starcoder2", "starcoder2", dict(sliding_window=None)),
    "starcoder2-no-bias": Case("starcoder2", "starcoder2", dict(sliding_window=None, use_bias=False,
                                                                tie_word_embeddings=False),
                               oracle_gap="it does not read use_bias: it builds every bias and initialises it"),
    # starcoder2-3b's RoPE base
    "starcoder2-theta": Case("starcoder2", "starcoder2", dict(sliding_window=None, rope_parameters=dict(
        rope_type="default", rope_theta=999999.4420358813)), oracle_gap="it ignores rope.freq_base (keeps 10000)"),
    # Nemotron as Minitron/Nemotron-Mini publish it: head size hidden / heads, half of each head rotates
    # (transformers' loader reads neither rope.dimension_count nor key_length: it keeps 0.5 and hidden / heads)
    "nemotron": Case("nemotron", "nemotron", dict(head_dim=None, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    "nemotron-odd-rotary": Case("nemotron", "nemotron", dict(hidden_size=96, head_dim=None),
                                oracle_gap="it ignores rope.dimension_count (15 of 24 dims here; it rotates 12)"),
    "gpt2": Case("gpt2", "gpt2", dict(n_positions=1024)),  # transformers' loader keeps n_positions=1024
    # llama.cpp writes feed_forward_length = 4 * hidden and context_length = 2048 for every Falcon
    "falcon": Case("falcon", "falcon", dict(_FALCON)),
    "falcon-new": Case("falcon-new", "falcon", dict(_FALCON), oracle_gap=_FALCON_GAP),
    # Falcon2-11B: the new decoder architecture with one shared norm
    "falcon-new-one-norm": Case("falcon-new", "falcon", dict(_FALCON, num_ln_in_parallel_attn=1),
                                oracle_gap=_FALCON_GAP),
}


def build_model(case: Case, seed: int = 0):
    """The tiny transformers model of ``case`` (random weights, every tensor perturbed, eval mode)."""
    if case.family not in FAMILIES:
        pytest.skip(f"tests/families.py has no {case.family!r} config")
    base = FAMILIES[case.family]()
    config = type(base).from_dict({**base.to_dict(), **case.overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ----------------------------------------------------------------------------- GGUF writer (llama.cpp's way)


def _tokens(vocab_size: int) -> list[str]:
    """A byte-level BPE vocabulary of exactly ``vocab_size`` tokens: 3 specials, characters, one merge."""
    chars = [chr(c) for c in range(ord("!"), ord("!") + vocab_size - 4)]
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *chars, "he"]


def _metadata(config, arch: str) -> dict[str, Any]:
    """The ``{arch}.*`` keys llama.cpp's converter writes for this architecture."""
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    if arch == "gpt2":
        return {K.BLOCK_COUNT: config.n_layer, K.CONTEXT_LENGTH: config.n_positions, K.EMBEDDING_LENGTH: config.n_embd,
                K.FEED_FORWARD_LENGTH: config.n_inner or 4 * config.n_embd, A.HEAD_COUNT: config.n_head,
                A.LAYERNORM_EPS: config.layer_norm_epsilon}
    if arch == "falcon":  # the converter's kv count from config.json: falcon-7b's has none (one KV head)
        kv = config.num_kv_heads if config.new_decoder_architecture else 1
        return {K.CONTEXT_LENGTH: 2048, K.EMBEDDING_LENGTH: config.hidden_size, K.FEED_FORWARD_LENGTH: 4 * config.hidden_size,
                K.BLOCK_COUNT: config.num_hidden_layers, A.HEAD_COUNT: config.num_attention_heads, A.HEAD_COUNT_KV: kv,
                A.LAYERNORM_EPS: config.layer_norm_epsilon}
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    if arch == "stablelm":  # LayerNorm, partial rotary, no RoPE base (llama.cpp's default 10000)
        head_dim = config.hidden_size // config.num_attention_heads
        return {K.CONTEXT_LENGTH: config.max_position_embeddings, K.EMBEDDING_LENGTH: config.hidden_size,
                K.BLOCK_COUNT: config.num_hidden_layers, K.FEED_FORWARD_LENGTH: config.intermediate_size,
                R.DIMENSION_COUNT: int(rope["partial_rotary_factor"] * head_dim),
                A.HEAD_COUNT: config.num_attention_heads, A.HEAD_COUNT_KV: config.num_key_value_heads,
                K.USE_PARALLEL_RESIDUAL: config.use_parallel_residual, A.LAYERNORM_EPS: config.layer_norm_eps}
    if arch == "starcoder2":  # LayerNorm (eps under its own key), no key_length
        return {K.CONTEXT_LENGTH: config.max_position_embeddings, K.EMBEDDING_LENGTH: config.hidden_size,
                K.BLOCK_COUNT: config.num_hidden_layers, K.FEED_FORWARD_LENGTH: config.intermediate_size,
                A.HEAD_COUNT: config.num_attention_heads, A.HEAD_COUNT_KV: config.num_key_value_heads,
                A.LAYERNORM_EPS: config.norm_epsilon, R.FREQ_BASE: rope["rope_theta"]}
    if arch == "nemotron":  # NemotronModel: norm_eps under both eps keys, vocab size, rotated dims, no scaling
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        return {K.CONTEXT_LENGTH: config.max_position_embeddings, K.EMBEDDING_LENGTH: config.hidden_size,
                K.BLOCK_COUNT: config.num_hidden_layers, K.FEED_FORWARD_LENGTH: config.intermediate_size,
                A.HEAD_COUNT: config.num_attention_heads, A.HEAD_COUNT_KV: config.num_key_value_heads,
                A.KEY_LENGTH: head_dim, A.VALUE_LENGTH: head_dim, K.VOCAB_SIZE: config.vocab_size,
                A.LAYERNORM_RMS_EPS: config.norm_eps, A.LAYERNORM_EPS: config.norm_eps,
                R.FREQ_BASE: rope["rope_theta"], R.SCALING_TYPE: "none",
                R.DIMENSION_COUNT: int(rope["partial_rotary_factor"] * head_dim)}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    meta = {K.CONTEXT_LENGTH: config.max_position_embeddings, K.EMBEDDING_LENGTH: config.hidden_size,
            K.BLOCK_COUNT: config.num_hidden_layers, K.FEED_FORWARD_LENGTH: config.intermediate_size,
            A.HEAD_COUNT: config.num_attention_heads, A.HEAD_COUNT_KV: config.num_key_value_heads,
            A.LAYERNORM_RMS_EPS: config.rms_norm_eps, R.FREQ_BASE: rope["rope_theta"]}
    if rope.get("rope_type") == "linear":
        meta |= {R.SCALING_TYPE: "linear", R.SCALING_FACTOR: rope["factor"]}
    if arch == "phi3":  # no key_length; the RoPE width says how much of a head rotates
        rotary = int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size) // config.num_attention_heads
        return meta | {R.DIMENSION_COUNT: rotary, A.SLIDING_WINDOW: config.sliding_window or 0}
    meta |= {A.KEY_LENGTH: head_dim, A.VALUE_LENGTH: head_dim}
    if arch == "llama":
        meta |= {K.VOCAB_SIZE: config.vocab_size, R.DIMENSION_COUNT: head_dim}
    if arch in ("gemma", "gemma2"):
        del meta[R.FREQ_BASE]  # llama.cpp's default 10000
    if arch == "gemma2":
        meta |= {K.ATTN_LOGIT_SOFTCAPPING: config.attn_logit_softcapping,
                 K.FINAL_LOGIT_SOFTCAPPING: config.final_logit_softcapping, A.SLIDING_WINDOW: config.sliding_window}
    if arch == "gemma3" and "sliding_attention" in config.layer_types:
        meta |= {A.SLIDING_WINDOW: config.sliding_window}
    return meta


def _gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """HF state dict -> GGUF tensors, renamed with gguf's own name map and changed as llama.cpp does."""
    config = model.config
    n_layer = config.num_hidden_layers
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layer)
    out, per_head = {}, {}
    for hf_name, value in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers
        if match := re.fullmatch(r"(.*_layernorm)\.norms\.(\d+)\.weight", hf_name):
            per_head.setdefault(match[1], {})[int(match[2])] = value.detach().float()
            continue  # StableLM's per-head norms: stacked below, as llama.cpp does
        if hf_name == "lm_head.weight" and config.tie_word_embeddings and arch != "gpt2":
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        value = value.detach().float().clone()
        leaf = name.split(".")[-2]
        if arch == "llama" and leaf in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if leaf == "attn_q" else config.num_key_value_heads
            value = value.reshape(heads, 2, -1, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        if (arch.startswith("gemma") or arch == "nemotron") and hf_name.endswith("norm.weight"):
            value = value + 1
        if arch == "gpt2" and leaf in ("attn_qkv", "attn_output", "ffn_up", "ffn_down") and value.ndim == 2:
            value = value.T.contiguous()
        if arch == "falcon" and leaf == "attn_qkv":  # per KV group [q_1..q_r|k|v] -> [q; k; v]
            groups = config.num_kv_heads if config.new_decoder_architecture else 1
            per_group = value.reshape(groups, config.num_attention_heads // groups + 2, -1, *value.shape[1:])
            value = torch.cat([per_group[:, :-2].flatten(0, 2), per_group[:, -2].flatten(0, 1),
                               per_group[:, -1].flatten(0, 1)]).reshape(value.shape)
        if arch == "gpt2" and name == "output.weight":
            continue  # written below, from the embedding, as llama.cpp does
        out[name] = value
    for stem, heads in per_head.items():
        out[f"{names.get_name(stem)}.weight"] = torch.stack([heads[h] for h in sorted(heads)])
    if arch == "gpt2":
        out["output.weight"] = out["token_embd.weight"].clone()
    return out


def write_gguf(
    model,
    case: Case,
    path: pathlib.Path,
    *,
    extra_keys: dict[str, Any] | None = None,
    drop_keys: tuple[str, ...] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
    arch: str | None = None,
) -> pathlib.Path:
    """Write ``model`` as llama.cpp's converter would (``arch`` relabels the file, for error tests)."""
    config = model.config
    source_arch = case.arch
    arch = arch or source_arch
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(case.name)
    keys = {k.format(arch=arch): v for k, v in _metadata(config, source_arch).items()}
    keys = {k: v for k, v in {**keys, **(extra_keys or {})}.items() if k not in drop_keys}
    for key, value in keys.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, int(value))
    tokens = _tokens(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)
    for name, value in _gguf_tensors(model, source_arch).items():
        array = value.numpy()
        writer.add_tensor(name, array.astype(np.float16) if case.f16 and array.ndim == 2 else array)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """case id -> (source model, GGUF path), each built once."""
    made = {}

    def get(case_id: str):
        if case_id not in made:
            case = CASES[case_id]
            model = build_model(case)
            folder = tmp_path_factory.mktemp(case_id)
            made[case_id] = model, write_gguf(model, case, folder / f"{case_id}.gguf")
        return made[case_id]

    return get


def _transformers_from_gguf(path: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _rounded_like_the_file(model, case: Case):
    """The source model with the rounding an F16 file applied to its matrices (norms and biases stay F32)."""
    if case.f16:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_logits_equal_source_model(case_id, written, tmp_path):
    source, path = written(case_id)
    llm = LLM.load(path, cache_dir=tmp_path / "cache")
    reference = _rounded_like_the_file(copy.deepcopy(source), CASES[case_id])
    with torch.no_grad():
        torch.testing.assert_close(llm.model(IDS), reference(IDS).logits, **TOL)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_logits_equal_transformers(case_id, written, tmp_path):
    if (gap := CASES[case_id].oracle_gap) is not None:
        pytest.skip(f"transformers' GGUF loader cannot be the oracle here: {gap}")
    _, path = written(case_id)
    llm = LLM.load(path, cache_dir=tmp_path / "cache")
    with torch.no_grad():
        torch.testing.assert_close(llm.model(IDS), _transformers_from_gguf(path)(IDS).logits, **TOL)


@pytest.mark.parametrize("case_id", sorted(c for c in CASES if CASES[c].oracle_gap is None))
def test_weights_and_config_equal_transformers(case_id, written, tmp_path):
    from safetensors.torch import load_file

    _, path = written(case_id)
    folder = gguf_to_hf_dir(path, cache_dir=tmp_path / "cache", progress=False)
    oracle = _transformers_from_gguf(path)
    reference = oracle.state_dict()
    ours = load_file(str(folder / "model.safetensors"))
    tied = oracle.config.tie_word_embeddings
    assert set(ours) == {n for n in reference if not (tied and n == "lm_head.weight") and not n.endswith(".attn.bias")}
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
    config = transformers.AutoConfig.from_pretrained(str(folder))
    assert type(config) is type(oracle.config)
    for key in CONFIG_KEYS:
        if hasattr(oracle.config, key) and key not in UNREAD_KEYS.get(type(config).__name__, ()):
            expected = getattr(oracle.config, key)
            if key in ROUNDED_KEYS.get(type(config).__name__, ()):
                expected = pytest.approx(expected, rel=1e-6)
            assert getattr(config, key) == expected, key


ARCHITECTURES = {
    "llama2": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "stablelm": "StableLmForCausalLM",
    "gpt2": "GPT2LMHeadModel", "falcon": "FalconForCausalLM", "falcon-new": "FalconForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM", "nemotron": "NemotronForCausalLM",
}  # fmt: skip


@pytest.mark.parametrize("case_id, architecture", sorted(ARCHITECTURES.items()))
def test_gguf_converts_to_its_family(case_id, architecture, written, tmp_path):
    folder = gguf_to_hf_dir(written(case_id)[1], cache_dir=tmp_path / "cache", progress=False)
    assert transformers.AutoConfig.from_pretrained(str(folder)).architectures == [architecture]
    # the architectures only llama.cpp's converter writes here are read in tests/test_gguf_export_llamacpp.py
    # (and tests/test_gguf_gpt_oss.py, tests/test_gguf_deepseek2.py)
    from test_gguf_export_llamacpp import CASES as LLAMACPP_CASES
    from test_gguf_deepseek2 import ARCHITECTURES as DEEPSEEK2_ARCHITECTURES
    from test_gguf_gpt_oss import ARCHITECTURES as GPT_OSS_ARCHITECTURES

    tested = {c.arch for c in (*CASES.values(), *LLAMACPP_CASES.values())}
    tested |= {*GPT_OSS_ARCHITECTURES, *DEEPSEEK2_ARCHITECTURES}
    assert sorted(lgguf.SUPPORTED_ARCHITECTURES) == sorted(tested)


# ----------------------------------------------------------------------------- what transformers drops


def _gemma_meta(arch: str, n_layer: int) -> dict[str, Any]:
    return {"general.architecture": arch, f"{arch}.embedding_length": 4608, f"{arch}.attention.head_count": 32,
            f"{arch}.attention.key_length": 128, f"{arch}.block_count": n_layer, f"{arch}.feed_forward_length": 36864,
            f"{arch}.attention.sliding_window": 4096, f"{arch}.vocab_size": 256000}


@pytest.mark.parametrize("arch, layers_27b", [("gemma2", 46), ("gemma3", 62)])
def test_gemma_27b_scales_attention_by_hidden_over_heads(arch, layers_27b):
    # llama.cpp: 1/sqrt(head_dim), except the 27B models: 1/sqrt(hidden / heads) (4608 / 32 = 144)
    config = lgguf._hf_config(_gemma_meta(arch, layers_27b), [], torch.float32)
    assert config["query_pre_attn_scalar"] == 144
    assert lgguf._hf_config(_gemma_meta(arch, 26), [], torch.float32)["query_pre_attn_scalar"] == 128


def test_gemma3_layer_pattern_follows_the_window():
    # llama.cpp: every 6th layer global when the file names a sliding window, else all global
    with_window = lgguf._hf_config(_gemma_meta("gemma3", 7), [], torch.float32)
    assert with_window["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert with_window["sliding_window"] == 4096
    meta = _gemma_meta("gemma3", 7)
    del meta["gemma3.attention.sliding_window"]
    without = lgguf._hf_config(meta, [], torch.float32)
    assert without["layer_types"] == ["full_attention"] * 7 and "sliding_window" not in without


# ----------------------------------------------------------------------------- files we refuse, with reasons


def _assert_refused(path: pathlib.Path, cache: pathlib.Path, *needles: str) -> None:
    with pytest.raises(GGUFError) as info:
        gguf_to_hf_dir(path, cache_dir=cache, progress=False)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    assert not cache.exists() or list(cache.iterdir()) == []


def test_longrope_is_refused(tmp_path):
    model = build_model(CASES["phi3"])
    factors = np.ones(8, dtype=np.float32)
    path = write_gguf(model, CASES["phi3"], tmp_path / "phi3-128k.gguf",
                      extra_tensors={"rope_factors_long.weight": factors, "rope_factors_short.weight": factors})
    _assert_refused(path, tmp_path / "cache", "'rope_factors_long.weight'", "LongRoPE")


def test_yarn_rope_scaling_is_refused(tmp_path):
    model = build_model(CASES["qwen2"])
    path = write_gguf(model, CASES["qwen2"], tmp_path / "yarn.gguf",
                      extra_keys={"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0})
    _assert_refused(path, tmp_path / "cache", "'qwen2.rope.scaling.type'", "'yarn'", "linear")


def test_missing_key_names_it(tmp_path):
    model = build_model(CASES["qwen3"])
    path = write_gguf(model, CASES["qwen3"], tmp_path / "no-blocks.gguf", drop_keys=("qwen3.block_count",))
    _assert_refused(path, tmp_path / "cache", "'qwen3.block_count'")


def test_wrongly_typed_key_names_it(tmp_path):
    model = build_model(CASES["gemma2"])
    path = write_gguf(model, CASES["gemma2"], tmp_path / "per-layer-heads.gguf",
                      extra_keys={"gemma2.attention.head_count_kv": [2, 2, 2]})
    _assert_refused(path, tmp_path / "cache", "'gemma2.attention.head_count_kv'", "[2, 2, 2]", "integer")


def test_mislabelled_file_says_what_it_looks_like(tmp_path):
    model = build_model(CASES["qwen3"])
    path = write_gguf(model, CASES["qwen3"], tmp_path / "qwen3-as-llama.gguf", arch="llama")
    _assert_refused(path, tmp_path / "cache", "'blk.0.attn_q_norm.weight'", "'llama' model", "qwen3")


def test_mixture_of_experts_llama_without_an_expert_count_is_refused(tmp_path):
    """A "llama" file with stacked experts is Mixtral's (tests/test_gguf_export_llamacpp.py reads llama.cpp's
    own); without llama.expert_count it cannot be run."""
    model = build_model(CASES["llama2"])
    experts = np.zeros((4, 96, 64), dtype=np.float32)
    path = write_gguf(model, CASES["llama2"], tmp_path / "mixtral.gguf",
                      extra_tensors={"blk.0.ffn_gate_exps.weight": experts})
    _assert_refused(path, tmp_path / "cache", "llama.expert_count")

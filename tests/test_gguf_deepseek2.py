"""DeepSeek-V2/V3 GGUF files (llama.cpp's ``deepseek2`` architecture, multi-head latent attention) -> lucidlm.

The oracle is the transformers model that llama.cpp's own converter (``convert_hf_to_gguf.py``, through
tests/llamacpp_driver.py) turned into the file, as in tests/test_gguf_gpt_oss.py: ``LLM.load(file)``
must compute its logits, and its greedy tokens through the (latent) KV cache must be transformers'
``generate``'s. (transformers 5.25's GGUF reader does not know ``deepseek2``.)

The cases are tests/families.py's tiny DeepSeek configs with SmolLM2's vocabulary: V2 (no low-rank q,
as V2-Lite; softmax routing, a dense first layer) with DeepSeek's YaRN (mscale = mscale_all_dim, as
in DeepSeek-V2's config), V2 with group-limited routing, and V3 (low-rank q, sigmoid routing in
groups with correction biases, renormalised and scaled weights) with ``scoring_func: sigmoid`` in its
config.json as the published DeepSeek-V3 config has it (the converter writes the gating function from it).
This converter splits ``kv_b_proj`` into ``attn_k_b``/``attn_v_b``: every file checks their fusing back.

Export: lucidlm's GGUF of each source checkpoint (F32; V3 also Q8_0) must hold what llama.cpp's converter
wrote (tests/test_gguf_export_llamacpp.py's standard); settings it would read back otherwise are refused.
"""

from __future__ import annotations

import json

import pytest
import torch

from families import FAMILIES
from lucidlm import LLM
from lucidlm.checkpoints.gguf import gguf_to_hf_dir
from lucidlm.checkpoints.gguf.deepseek2 import deepseek2_config
from lucidlm.checkpoints.gguf.reader import Keys
from lucidlm.errors import ExportError, GGUFError
from lucidlm.generate import generate_ids

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from test_families_dense import hf_greedy  # noqa: E402 - after the importorskips
from gguf_compare import differences  # noqa: E402
from test_gguf_export_llamacpp import PATH_GUESSED_KEYS, _SPECIAL  # noqa: E402
from test_gguf_gpt_oss import llamacpp_convert, require_converter  # noqa: E402

ARCHITECTURES = ("deepseek2",)  # the GGUF architectures this module reads (tests/test_gguf_families.py counts them)
IDS = torch.tensor([[1, 5, 17, 42, 9, 3, 60, 11, 88, 20, 300, 7]])
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16, beta_fast=32.0,
             beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)
# family, config overrides, config.json additions
CASES = {
    "v2-yarn": ("deepseek-v2", dict(rope_parameters=_YARN), {}),
    "v2-groups": ("deepseek-v2", dict(n_group=2, topk_group=1, topk_method="group_limited_greedy"), {}),
    "v3": ("deepseek-v3", {}, dict(scoring_func="sigmoid")),
}


def _source_model(family: str, overrides: dict):
    base = FAMILIES[family]()
    config = type(base).from_dict({**base.to_dict(), **_SPECIAL, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, buffer in model.named_buffers():  # V3's routing correction biases start at zero
            if name.endswith("e_score_correction_bias"):
                buffer.add_(torch.randn_like(buffer) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, converted):
    """case -> (transformers model, llama.cpp's F32 GGUF of it), and "v3-q8_0" (V3 as llama.cpp's Q8_0), every
    case converted in one process."""
    from lucidlm.checkpoints.hf import copy_tokenizer_files

    require_converter()
    root = tmp_path_factory.mktemp("deepseek2-gguf")
    models, directories = {}, {}
    for case, (family, overrides, added) in CASES.items():
        models[case], directories[case] = _source_model(family, overrides), root / case
        models[case].save_pretrained(directories[case])
        path = directories[case] / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | added))
        copy_tokenizer_files(converted, directories[case])
    directories["v3-q8_0"] = directories["v3"]  # the export's other type
    paths = llamacpp_convert(directories, root, types={"v3-q8_0": "q8_0"})
    return {name: (models[name.removesuffix("-q8_0")], paths[name]) for name in directories}


def test_the_files_are_what_llamacpp_writes_for_deepseek(files):
    """The cases test what they claim: split k_b/v_b everywhere, sigmoid routing and its biases in V3,
    YaRN's log multiplier and the routing groups where the source has them."""
    for case in CASES:
        reader = gguf.GGUFReader(files[case][1])
        meta = {k: f.contents() for k, f in reader.fields.items()}
        names = {t.name for t in reader.tensors}
        assert meta["general.architecture"] == "deepseek2"
        assert {"blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"} <= names and "blk.0.attn_kv_b.weight" not in names
        assert ("blk.1.exp_probs_b.bias" in names) == (meta.get("deepseek2.expert_gating_func") == 2) == (case == "v3")
        assert ("deepseek2.rope.scaling.yarn_log_multiplier" in meta) == (case == "v2-yarn")
        assert ("deepseek2.expert_group_count" in meta) == (case != "v2-yarn")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_source_model(files, case, tmp_path):
    model, path = files[case]
    with torch.no_grad():
        got = LLM.load(path, cache_dir=tmp_path).model(IDS)
        torch.testing.assert_close(got, model(IDS).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_greedy_tokens_equal_transformers_generate(files, case, tmp_path):
    model, path = files[case]
    prompt = IDS[0, :6].tolist()
    ours = [step[0] for step in generate_ids(LLM.load(path, cache_dir=tmp_path).model, [prompt], 10)]
    assert ours == hf_greedy(model, prompt, 10)


_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "first_k_dense_replace",
           "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
           "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "topk_method", "n_group", "topk_group",
           "norm_topk_prob", "max_position_embeddings", "vocab_size", "tie_word_embeddings", "model_type",
           "architectures")


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_is_the_source_models(files, case, tmp_path):
    model, path = files[case]
    ours = json.loads((gguf_to_hf_dir(path, cache_dir=tmp_path, progress=False) / "config.json").read_text())
    source = model.config.to_dict()
    fields = [key for key in _FIELDS if key in source]  # DeepseekV3Config has no topk_method
    assert len(fields) >= len(_FIELDS) - 1
    for key in fields:
        assert ours[key] == source[key], key
    for key in ("rms_norm_eps", "routed_scaling_factor"):
        assert ours[key] == pytest.approx(source[key]), key
    assert ours["rope_parameters"] == pytest.approx(source["rope_parameters"])


@pytest.mark.parametrize("case, kind", [(case, "f32") for case in sorted(CASES)] + [("v3", "q8_0")])
def test_export_equals_llamacpps_conversion(files, case, kind, tmp_path):
    """lucidlm's export of the source checkpoint holds what llama.cpp's converter wrote (tensors, metadata:
    tests/test_gguf_export_llamacpp.py's standard; the converter also guesses general.version from the
    folder's name), and its F32 export reads back to the source's logits."""
    model, path = files[case if kind == "f32" else f"{case}-{kind}"]
    ours = LLM.load(files[case][1].with_suffix("")).export_gguf(tmp_path / "ours.gguf", type=kind)
    assert differences(ours, path, ignored_keys=PATH_GUESSED_KEYS | {"general.version"}) == []
    if kind == "f32":
        with torch.no_grad():
            torch.testing.assert_close(LLM.load(ours, cache_dir=tmp_path / "cache").model(IDS), model(IDS).logits,
                                       atol=1e-4, rtol=1e-4)


_GREEDY_V2 = dict(n_group=None, topk_group=None, topk_method="greedy")


@pytest.mark.parametrize("case, change, match", [
    ("v2-groups", dict(topk_method="greedy"), "topk_method='greedy'"),  # groups that V2's reader would route by
    ("v2-groups", dict(_GREEDY_V2, norm_topk_prob=True), "norm_topk_prob=True"),
    ("v2-yarn", dict(rope_parameters=dict(_YARN, mscale=1.0)), "mscale=1.0"),
    ("v3", dict(rope_interleave=False), "rope_interleave=False"),
])
def test_export_refuses_what_lucidlm_would_read_back_otherwise(files, case, change, match, tmp_path):
    llm = LLM.load(files[case][1], cache_dir=tmp_path / "cache")
    llm.model.config.hf_config = {**llm.model.config.hf_config, **change}
    with pytest.raises(ExportError, match=match):
        llm.export_gguf(tmp_path / "out.gguf", type="f32")
    assert not (tmp_path / "out.gguf").exists()


# ----------------------------------------------------------------------------- bad metadata

_META = {"general.architecture": "deepseek2", "deepseek2.embedding_length": 64, "deepseek2.block_count": 3,
         "deepseek2.feed_forward_length": 96, "deepseek2.attention.head_count": 4, "deepseek2.context_length": 128,
         "deepseek2.rope.dimension_count": 6, "deepseek2.attention.kv_lora_rank": 16,
         "deepseek2.attention.key_length": 22, "deepseek2.attention.value_length": 16,
         "deepseek2.attention.key_length_mla": 18, "deepseek2.attention.value_length_mla": 10,
         "deepseek2.expert_count": 4, "deepseek2.expert_used_count": 2, "deepseek2.expert_feed_forward_length": 24}
_YARN_META = {"deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 8.0,
              "deepseek2.rope.scaling.original_context_length": 16}


@pytest.mark.parametrize("extra, key", [
    ({"deepseek2.expert_gating_func": 3}, "expert_gating_func"),
    ({"deepseek2.expert_gating_func": 2}, "expert_gating_func"),  # sigmoid without exp_probs_b tensors
    ({"deepseek2.expert_weights_norm": True}, "expert_weights_norm"),  # V2's router does not renormalise
    ({"deepseek2.attention.temperature_scale": 0.1}, "attention.temperature_scale"),
    (_YARN_META, "rope.scaling.yarn_log_multiplier"),
    ({"deepseek2.rope.scaling.type": "linear"}, "rope.scaling.type"),
])
def test_metadata_lucidlm_cannot_run_is_a_gguf_error_naming_the_key(extra, key):
    with pytest.raises(GGUFError, match=r"deepseek2\." + key.replace(".", r"\.")):
        deepseek2_config(Keys(_META | extra, "tiny.gguf"), frozenset())


def test_files_without_the_mla_keys_read_the_head_sizes_from_key_length():
    """Files written before llama.cpp split kv_b (no key_length_mla/value_length_mla) name the per-head
    sizes in key_length/value_length."""
    meta = {k: v for k, v in _META.items() if "_mla" not in k} | {"deepseek2.attention.key_length": 18,
                                                                    "deepseek2.attention.value_length": 10}
    config = deepseek2_config(Keys(meta, "tiny.gguf"), frozenset())
    assert (config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]) == (12, 6, 10)


# DeepSeek-Coder-V2-Lite-Instruct-Q4_K_M.gguf (DeepSeek-V2-Lite's architecture, from an older converter: one KV
# head per query head, no _mla keys, kv_b unsplit): its deepseek2.* keys as llama.cpp's loader lists them
PUBLISHED_V2_LITE = {
    "deepseek2.block_count": 27, "deepseek2.context_length": 163840, "deepseek2.embedding_length": 2048,
    "deepseek2.feed_forward_length": 10944, "deepseek2.attention.head_count": 16, "deepseek2.attention.head_count_kv": 16,
    "deepseek2.rope.freq_base": 10000.0, "deepseek2.attention.layer_norm_rms_epsilon": 1e-06,
    "deepseek2.expert_used_count": 6, "deepseek2.leading_dense_block_count": 1, "deepseek2.vocab_size": 102400,
    "deepseek2.attention.kv_lora_rank": 512, "deepseek2.attention.key_length": 192,
    "deepseek2.attention.value_length": 128, "deepseek2.expert_feed_forward_length": 1408, "deepseek2.expert_count": 64,
    "deepseek2.expert_shared_count": 2, "deepseek2.expert_weights_scale": 1.0, "deepseek2.rope.dimension_count": 64,
    "deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 40.0,
    "deepseek2.rope.scaling.original_context_length": 4096, "deepseek2.rope.scaling.yarn_log_multiplier": 0.0707,
}


def test_published_gguf_header_reads_as_the_published_config():
    """A published DeepSeek-V2-Lite-architecture GGUF's header gives the model DeepSeek-V2-Lite's config.json
    describes (the catalogue's copy): every lucidlm Config field, YaRN's mscales included."""
    from test_gguf_gpt_oss import published_config_differences

    assert published_config_differences({"general.architecture": "deepseek2", **PUBLISHED_V2_LITE}, 102400,
                                        "DeepSeek-V2-Lite") == []


def test_older_files_with_unsplit_kv_b_load(files, tmp_path):
    """Files from before llama.cpp split kv_b (published DeepSeek-V2 GGUFs): ``attn_kv_b`` as transformers'
    kv_b_proj, head_count_kv = head_count and the per-head sizes in key_length/value_length, without the _mla
    keys. Made from llama.cpp's file by putting the source model's own kv_b_proj in place of attn_k_b/attn_v_b."""
    from lucidlm.checkpoints.gguf import read_metadata
    from lucidlm.checkpoints.gguf.reader import dequantize
    from lucidlm.checkpoints.gguf.writer import write_gguf

    model, path = files["v3"]
    c = model.config
    meta = {k: v for k, v in read_metadata(path).items()
            if not k.endswith("_mla") and k not in ("general.architecture", "general.file_type",
                                                    "general.quantization_version", "general.type")}
    meta |= {"deepseek2.attention.head_count_kv": c.num_attention_heads,
             "deepseek2.attention.key_length": c.qk_nope_head_dim + c.qk_rope_head_dim,
             "deepseek2.attention.value_length": c.v_head_dim}
    tensors = {t.name: torch.from_numpy(dequantize(t)) for t in gguf.GGUFReader(path).tensors
               if ".attn_k_b." not in t.name and ".attn_v_b." not in t.name}
    for i, layer in enumerate(model.model.layers):
        tensors[f"blk.{i}.attn_kv_b.weight"] = layer.self_attn.kv_b_proj.weight.detach()
    older = write_gguf(tmp_path / "older.gguf", "deepseek2", tensors, meta, "f32")
    with torch.no_grad():
        torch.testing.assert_close(LLM.load(older, cache_dir=tmp_path / "cache").model(IDS), model(IDS).logits,
                                   atol=1e-4, rtol=1e-4)

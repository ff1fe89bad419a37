"""LoRA and LLaMA-Adapter fine-tuning on every family of tests/families.py, through ``LLM.finetune``.

LoRA: a few steps on tiny text lower the loss; the adapter the run writes (PEFT's format, the
checkpoint's module names) loads onto the ``transformers`` model with ``peft`` and gives our adapted
logits (the oracle: peft's LoRA on transformers' modules); merging it into the weights keeps them.
The default targets are every attention/MLP linear layer (MLA's low-rank factors and JetMoE's kv_proj
included); in a model with MoE layers the attention's only, since peft converts MLP targets of such
a model onto transformers 5's fused expert parameters. MoE LoRA layers hold no expert.

LLaMA-Adapter V2: trains and writes LitGPT's files, except on attentions without per-head q/k/v
projections (MLA, JetMoE's mixture of attention heads), which it refuses with a typed error."""

import json
import shutil

import pytest
import torch

import lucidlm
from lucidlm.errors import AdapterError, TrainError
from lucidlm.train.lora import lora_layers, merge_lora
from families import FAMILIES, build_hf_model

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

TEXTS = [{"text": f"{a} plus {b} is {a + b}. the sum of {a} and {b} is {a + b}."} for a in range(4) for b in range(3)]
OPTIONS = dict(steps=6, batch_size=4, lr=2e-2, val_split=0.0, precision="fp32", progress=False, max_seq_length=48)
#: families whose attention has no per-head q/k/v projections for LLaMA-Adapter's prefix
NO_PREFIX = {"deepseek-v2": "MLAttention", "deepseek-v3": "MLAttention", "jetmoe": "MoAttention"}


def with_tokenizer(directory, dest):
    """A copy of the checkpoint with a character-level tokenizer inside its 96-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    shutil.copytree(directory, dest)
    chars = " abcdefghijklmnopqrstuvwxyz0123456789.,?"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return dest


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_finetune_saves_an_adapter_peft_loads_and_merges(family, hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(with_tokenizer(directory, tmp_path / "model"))
    result = llm.finetune(TEXTS, method="lora", out=tmp_path / "run", **OPTIONS)
    assert result.losses[-1] < result.losses[0], result.losses
    adapted = {name.rsplit(".", 1)[-1] for name in lora_layers(llm.model)}
    assert adapted and not any(".experts." in name for name in lora_layers(llm.model))
    if llm.config.n_expert:
        assert not any(".mlp." in name for name in lora_layers(llm.model))
    ids = torch.randint(3, 43, (2, 9), generator=torch.Generator().manual_seed(5))
    ours = logits(llm.model, ids)
    base = build_hf_model(family)  # the saved checkpoint's weights (same seed)
    before = logits(base, ids)
    theirs = logits(peft.PeftModel.from_pretrained(base, tmp_path / "run").eval(), ids)
    assert rel_err(ours, before) > 1e-4  # the adapter matters
    assert rel_err(ours, theirs) < 1e-4, f"{family}: peft's adapted logits differ"
    merge_lora(llm.model)
    assert not lora_layers(llm.model) and rel_err(logits(llm.model, ids), ours) < 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_v2_finetune_or_a_typed_refusal(family, hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(with_tokenizer(directory, tmp_path / "model"))
    options = dict(OPTIONS, adapter_prompt_length=3, adapter_start_layer=1)
    if family in NO_PREFIX:
        with pytest.raises(TrainError, match=f"layers.1.attn: LLaMA-Adapter .* {NO_PREFIX[family]} does not have"):
            llm.finetune(TEXTS, method="adapter_v2", out=tmp_path / "run", **options)
        assert not (tmp_path / "run" / "lit_model.pth.adapter_v2").exists()
        return
    result = llm.finetune(TEXTS, method="adapter_v2", out=tmp_path / "run", **options)
    assert result.losses[-1] < result.losses[0], result.losses
    assert (tmp_path / "run" / "lit_model.pth.adapter_v2").is_file()
    ids = torch.randint(3, 43, (1, 7), generator=torch.Generator().manual_seed(3))
    reloaded = lucidlm.LLM.load(tmp_path / "model")
    reloaded.load_adapter(tmp_path / "run")
    torch.testing.assert_close(logits(reloaded.model, ids), logits(llm.model, ids))


@pytest.mark.parametrize("family, target, module", [("gpt-oss", "gate_up", "layers.0.mlp.experts.gate_up"),
                                                    ("dbrx", "experts", "layers.0.mlp.experts"),
                                                    ("jetmoe", "input_linear", "layers.0.attn.experts.input_linear")])
def test_lora_on_stacked_experts_is_a_typed_error(family, target, module, hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(with_tokenizer(directory, tmp_path / "model"))
    with pytest.raises(TrainError, match=f"lora_targets: '{target}' names {module}, a .* which LoRA cannot wrap"):
        llm.finetune(TEXTS, method="lora", lora_targets=(target,), out=tmp_path / "run", **OPTIONS)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_lora_on_linear_experts_trains_and_merges_but_is_not_saved(hf_checkpoint, tmp_path):
    """Experts that are linear layers here (Qwen3-MoE) take LoRA and merge, but transformers 5 fuses
    them, so the adapter has no PEFT file to go to: a run that would save it is refused before it
    trains, naming the expert."""
    _, directory = hf_checkpoint("qwen3-moe")
    llm = lucidlm.LLM.load(with_tokenizer(directory, tmp_path / "model"))
    targets = ("q_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(AdapterError, match=r"layers\.1\.mlp\.experts\.\d+\.\w+_proj: LoRA on mixture-of-experts experts"):
        llm.finetune(TEXTS, method="lora", lora_targets=targets, out=tmp_path / "run", **OPTIONS)
    assert not lora_layers(llm.model) and not (tmp_path / "run").exists()
    result = llm.finetune(TEXTS, method="lora", lora_targets=targets, **OPTIONS)  # no out: nothing to save
    assert result.losses[-1] < result.losses[0]
    assert any(".experts." in name for name in lora_layers(llm.model))
    ids = torch.randint(3, 43, (1, 7), generator=torch.Generator().manual_seed(3))
    adapted = logits(llm.model, ids)
    merge_lora(llm.model)
    assert rel_err(logits(llm.model, ids), adapted) < 1e-5

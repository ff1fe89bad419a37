"""LoRA adapters against the oracle, transformers + peft, both ways, on every layout kind we map
(separate projections, GPT-2's transposed fused c_attn, NeoX's interleaved query_key_value, Phi-3's
fused qkv_proj/gate_up_proj); explanations hold through LoRA layers; ``lucidlm merge``."""

import json

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

import lucidlm  # noqa: E402
from lucidlm.cli import main  # noqa: E402
from lucidlm.errors import AdapterError  # noqa: E402
from lucidlm.train.lora import attach_lora, lora_layers, save_adapter  # noqa: E402
from families import build_hf_model  # noqa: E402

FAMILIES = ["smollm2", "qwen2", "gpt2", "pythia", "phi3", "phi2"]
TARGETS = {"phi2": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}  # Phi-2 has no gate
PEFT_TARGETS = {"phi2": ["q_proj", "v_proj", "dense", "fc1", "fc2"]}  # the same modules, by HF names


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomise_b(model, seed: int = 0) -> None:
    """LoRA starts with B = 0 (a no-op); random B makes every adapter matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.1)


def ids_for(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(5))


def assert_same_adapted_logits(llm, peft_model, family: str) -> None:
    """Our adapted model and peft's give the same logits, and the adapter changes them."""
    ids = ids_for(llm.config.vocab_size)
    with torch.no_grad():
        ours, theirs = llm.model(ids), peft_model(ids).logits
        base = build_hf_model(family)(ids).logits
    assert rel_err(theirs, base) > 1e-3  # the adapter matters
    assert rel_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_our_adapter_loads_in_peft_with_our_logits(family, hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    torch.manual_seed(0)
    # v_proj with its own rank and alpha: exercises rank_pattern/alpha_pattern in adapter_config.json
    attach_lora(llm.model, r=4, alpha=8, targets=TARGETS.get(family), rank_pattern={"v_proj": 2},
                alpha_pattern={"v_proj": 3})
    randomise_b(llm.model)
    save_adapter(llm.model, tmp_path, base_model=str(directory))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    hf = build_hf_model(family)  # same seed: the same weights as the saved checkpoint
    assert_same_adapted_logits(llm, peft.PeftModel.from_pretrained(hf, tmp_path).eval(), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_here_with_peft_logits(family, hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint(family)
    hf = build_hf_model(family)
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=PEFT_TARGETS.get(family, "all-linear"),
                             init_lora_weights=False,
                             rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 7})
    model = peft.get_peft_model(hf, config).eval()
    model.save_pretrained(tmp_path)
    assert_same_adapted_logits(lucidlm.LLM.load(directory, adapter=tmp_path), model, family)


def test_merge_cli_writes_a_checkpoint_transformers_loads(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("smollm2")
    llm = lucidlm.LLM.load(directory)
    attach_lora(llm.model, r=4, alpha=8)
    randomise_b(llm.model)
    save_adapter(llm.model, tmp_path / "adapter", base_model=str(directory))
    assert main(["merge", str(directory), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = peft.PeftModel.from_pretrained(build_hf_model("smollm2"), tmp_path / "adapter").eval()
    ids = ids_for(llm.config.vocab_size)
    with torch.no_grad():
        assert rel_err(merged(ids).logits, expected(ids).logits) <= 1e-4
    assert main(["merge", str(directory), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2  # not empty


def test_explanations_hold_through_lora(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("llama2")  # no biases: CP-LRP conserves exactly
    llm = lucidlm.LLM.load(directory, dtype=torch.float64)
    attach_lora(llm.model, r=4, alpha=8)
    randomise_b(llm.model)
    prompt = [5, 17, 33, 8, 61, 12]
    exp = llm.explain(prompt, target=7, method="cp-lrp")
    with torch.no_grad():
        logit = llm.model(torch.tensor([prompt]))[0, -1, 7].item()
    assert exp.target_logit == pytest.approx(logit, rel=1e-9)
    assert exp.relevance.double().sum().item() == pytest.approx(logit, rel=1e-4)
    with_lora = llm.explain(prompt, target=7, method="attnlrp").relevance
    llm.merge_adapter()
    assert not lora_layers(llm.model)
    merged = llm.explain(prompt, target=7, method="attnlrp").relevance
    torch.testing.assert_close(with_lora, merged, rtol=1e-6, atol=1e-9)


def test_adapter_for_another_base_is_refused(hf_checkpoint, tiny_lm_dir, tmp_path):
    _, directory = hf_checkpoint("smollm2")
    llm = lucidlm.LLM.load(directory)
    attach_lora(llm.model, r=2, alpha=4)
    save_adapter(llm.model, tmp_path / "a", base_model=str(directory))
    with pytest.raises(AdapterError, match=r"do not fit the base layer"):
        lucidlm.LLM.load(tiny_lm_dir, adapter=tmp_path / "a", check_base=False)  # shapes differ
    with pytest.raises(AdapterError, match=r"trained on .*smollm2.*check_base=False"):
        lucidlm.LLM.load(tiny_lm_dir, adapter=tmp_path / "a")  # the recorded base differs


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json: no such file"),
    (lambda d: (d / "adapter_config.json").write_text("{nope"), "adapter_config.json: not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 5), "cannot read adapter weights"),
    (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), "only LoRA adapters are supported"),
    (lambda d: _edit_config(d, use_dora=True), "use_dora=True is not supported"),
    (lambda d: _edit_config(d, bias="all"), "bias='all' is not supported"),
    (lambda d: _edit_tensors(d, lambda t: t.pop(sorted(k for k in t if "lora_B" in k)[0])), "but not its partner"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A":
                                                   torch.zeros(2, 3)})), "unexpected tensor"),
    (lambda d: _edit_config(d, modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] is not supported"),
])
def test_broken_adapters_raise_typed_errors(hf_checkpoint, tmp_path, damage, message):
    _, directory = hf_checkpoint("smollm2")
    llm = lucidlm.LLM.load(directory)
    attach_lora(llm.model, r=2, alpha=4)
    save_adapter(llm.model, tmp_path)
    damage(tmp_path)
    with pytest.raises(AdapterError, match=message):
        lucidlm.LLM.load(directory, adapter=tmp_path)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_mixtral_attention_adapter_round_trips_and_experts_are_refused(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("mixtral")
    llm = lucidlm.LLM.load(directory)
    attach_lora(llm.model, r=4, alpha=8)  # default on MoE: attention projections only
    assert not any(".experts." in name for name in lora_layers(llm.model))
    randomise_b(llm.model)
    save_adapter(llm.model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build_hf_model("mixtral"), tmp_path / "a").eval()
    ids = ids_for(llm.config.vocab_size)
    with torch.no_grad():
        assert rel_err(llm.model(ids), theirs(ids).logits) <= 1e-4
    other = lucidlm.LLM.load(directory)
    attach_lora(other.model, r=2, alpha=4, targets=["gate_proj"])
    with pytest.raises(AdapterError, match="mixture-of-experts"):
        save_adapter(other.model, tmp_path / "b")


def test_latent_relevances_through_lora(hf_checkpoint):
    _, directory = hf_checkpoint("llama2")
    llm = lucidlm.LLM.load(directory)
    attach_lora(llm.model, r=4, alpha=8)
    randomise_b(llm.model)
    e = llm.explain([5, 17, 33, 8], target=7, method="attnlrp", layers="all")
    assert e.relevance.shape == (4,)
    assert e.layers and all(torch.isfinite(torch.as_tensor(v)).all() for v in e.layers.values())


def test_peft_adapter_on_the_real_smollm2_loads_onto_the_embedded_gguf(tmp_path):
    """transformers reads the embedded GGUF itself; peft adapts it; we load that adapter onto our
    own conversion of the same file (a different path: the base check must still accept it)."""
    import transformers

    from lucidlm.checkpoints.embedded import default_model_path

    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    adapted = peft.get_peft_model(hf, config).eval()
    adapted.save_pretrained(tmp_path)
    llm = lucidlm.LLM.load(adapter=tmp_path)
    ids = torch.tensor([llm.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert rel_err(llm.model(ids), adapted(ids).logits) <= 1e-4


def _edit_tensors(directory, change):
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)

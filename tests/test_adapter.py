"""LLaMA-Adapter and AdapterV2 in lucidlm: explanations (the conservation check, where relevance
goes), the KV-cache path, LitGPT files written and read back, the base check, merging, and
fine-tuning (it learns, it resumes, the CLI takes the options). Logits against LitGPT's own modules:
tests/test_adapter_litgpt.py."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import lucidlm
from lucidlm import GPT, Config
from lucidlm.cache.base import dense_cache
from lucidlm.errors import AdapterError, TrainError
from lucidlm.explain import check
from lucidlm.model import rules
from lucidlm.train.adapter import adapter_state, attach_adapter, has_adapter, merge_adapter, prefix_layers
from lucidlm.train.adapter_files import CONFIG_YAML, WEIGHTS, load_litgpt_adapter, save_litgpt_adapter
from lucidlm.train.base_check import FINGERPRINT_FILE
from lucidlm.train.finetune import answer_loss

VERSIONS = ("adapter", "adapter_v2")
TOL = dict(atol=1e-5, rtol=1e-5)


def randomize(model, seed: int = 0, zero_bias: bool = False) -> None:
    """Random adapter tensors (gates non-zero); ``zero_bias``: V2's adapter_bias stays zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(adapter_state(model).items()):
            if zero_bias and name.endswith("adapter_bias"):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.3
            p.copy_(1 + noise if name.endswith(("adapter_scale", "norm.weight")) else noise * 3)


def adapted(family_or_config, version, hf_checkpoint=None, **kw):
    if hf_checkpoint is not None:
        model = lucidlm.LLM.load(hf_checkpoint(family_or_config)[1]).model
    else:
        torch.manual_seed(0)
        model = GPT(Config.from_name(family_or_config, **kw))
    attach_adapter(model, version, prompt_length=3, start_layer=1)
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("family", ["llama3", "gemma2", "phi2", "pythia-sequential", "qwen3", "mixtral", "olmo2"])
def test_conservation_check_passes_on_adapted_models(family, version, hf_checkpoint):
    report = check(adapted(family, version, hf_checkpoint))
    assert report.ok, str(report)


def _cp_lrp(model, ids):
    """CP-LRP relevance at the embeddings, at the prefixes and at V2's biases, and the logit."""
    model = model.double()
    positions = torch.arange(ids.shape[1])[None]
    h0 = model.embed_tokens(ids, positions).detach().requires_grad_(True)
    absorbing = [p for n, p in model.named_parameters() if n.endswith(("adapter_wte.weight", "adapter_bias"))]
    with rules.explaining("cp-lrp"):
        logits = model(inputs_embeds=h0, positions=positions)
    logit = logits[0, -1].max()
    grads = torch.autograd.grad(logit, [h0, *absorbing], allow_unused=True)
    inputs = float((h0 * grads[0]).sum().detach())
    held = float(sum((p * g).sum() for p, g in zip(absorbing, grads[1:]) if g is not None).detach())
    return float(logit.detach()), inputs, held


@pytest.mark.parametrize("version", VERSIONS)
def test_cp_lrp_conserves_and_the_prefix_holds_the_rest(version):
    """tiny-llama has no biases: at zero gates and zero adapter_bias every bit of the logit reaches
    the embeddings; with a trained adapter the prefix (a constant under CP-LRP, like a bias) and V2's
    adapter_bias hold the rest, and inputs + adapter = logit exactly."""
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    model = adapted("tiny-llama", version, n_layer=3)
    with torch.no_grad():
        for layer in prefix_layers(model).values():
            layer.gating_factor.zero_()
        for name, p in model.named_parameters():
            if name.endswith("adapter_bias"):
                p.zero_()
    logit, inputs, held = _cp_lrp(model, ids)
    assert inputs == pytest.approx(logit, rel=1e-9) and held == pytest.approx(0, abs=1e-9)
    randomize(model, seed=3)
    logit, inputs, held = _cp_lrp(model, ids)
    assert abs(held) > 1e-3 * abs(logit)  # the adapter holds a visible share
    assert inputs + held == pytest.approx(logit, rel=1e-9)


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_prefix_attention_takes_the_attention_rules(method):
    """As the main attention: AttnLRP's uniform rule on q·kᵀ and on A·V (the queries get a quarter
    of the plain gradient), CP-LRP's constant softmax (the queries get nothing, the prefix values all
    of it); the gate is a weight, so it takes no share."""
    model = adapted("tiny-llama", "adapter", n_layer=2).double()
    attn = prefix_layers(model)[1]
    q = torch.randn(1, 4, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grads(explaining):
        x = q.clone().requires_grad_(True)
        attn.zero_grad()
        if explaining:
            with rules.explaining(method):
                out = attn.prefix_attention(x)
        else:
            out = attn.prefix_attention(x)
        out.sum().backward()
        return x.grad, attn.adapter_wte.weight.grad.clone(), attn.gating_factor.grad

    plain_q, plain_wte, _ = grads(False)
    ruled_q, ruled_wte, ruled_gate = grads(True)
    assert ruled_gate is None  # the gate is a constant for the explanation
    if method == "attnlrp":
        torch.testing.assert_close(ruled_q, plain_q / 4)
    else:
        assert ruled_q is None or not ruled_q.any()
        assert not torch.allclose(ruled_wte, plain_wte)  # the keys' share through the softmax is gone


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("family", ["llama3", "gemma2", "mistral"])
def test_kv_cache_decode_equals_the_full_forward(family, version, hf_checkpoint):
    model = adapted(family, version, hf_checkpoint)
    ids = torch.randint(3, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = dense_cache(model.config, batch=2, capacity=32)
        steps = [model(ids[:, :6], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(6, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
        # greedy decoding through the cache picks what the full forward picks
        tokens, cache = ids[:1, :5], dense_cache(model.config, batch=1, capacity=32)
        logits = model(tokens, cache=cache)[:, -1]
        for _ in range(6):
            token = logits.argmax(-1, keepdim=True)
            assert int(token) == int(model(tokens)[0, -1].argmax())
            tokens = torch.cat([tokens, token], dim=1)
            logits = model(token, cache=cache)[:, -1]


@pytest.mark.parametrize("version", VERSIONS)
def test_saved_adapter_reloads_with_the_same_logits(version, tmp_path):
    model = adapted("tiny-llama", version, n_layer=3)
    out = save_litgpt_adapter(model, tmp_path / "run", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    # nothing temporary; the base weights' fingerprint beside LitGPT's two files
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS[version], CONFIG_YAML, FINGERPRINT_FILE])
    fields = yaml.safe_load((out / CONFIG_YAML).read_text())
    assert (fields["adapter_prompt_length"], fields["adapter_start_layer"]) == (3, 1)
    assert fields["hf_config"] == {"org": "HuggingFaceTB", "name": "SmolLM2-135M-Instruct"}
    saved = torch.load(out / WEIGHTS[version], weights_only=True)["model"]
    assert "transformer.h.1.attn.gating_factor" in saved and "transformer.h.0.attn.adapter_wte.weight" not in saved
    torch.manual_seed(0)
    fresh = GPT(Config.from_name("tiny-llama", n_layer=3)).eval()
    load_litgpt_adapter(fresh, out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), atol=0, rtol=0)
    torch.manual_seed(1)  # the same architecture with other weights: the fingerprint refuses it
    other = GPT(Config.from_name("tiny-llama", n_layer=3)).eval()
    with pytest.raises(AdapterError, match="weights differ from this model's"):
        load_litgpt_adapter(other, out)
    load_litgpt_adapter(other, out, check_base=False)


def test_a_different_base_is_refused_naming_the_field(tmp_path):
    model = adapted("tiny-llama", "adapter", n_layer=3)
    out = save_litgpt_adapter(model, tmp_path)
    fields = yaml.safe_load((out / CONFIG_YAML).read_text())
    fields["intermediate_size"] += 8
    (out / CONFIG_YAML).write_text(yaml.safe_dump(fields))
    with pytest.raises(AdapterError, match=r"intermediate_size: 136 \(file\) vs 128 \(model\).*check_base=False"):
        load_litgpt_adapter(GPT(Config.from_name("tiny-llama", n_layer=3)), out)
    assert has_adapter(_loaded(out, check_base=False))


def _loaded(out, **kw):
    model = GPT(Config.from_name("tiny-llama", n_layer=3))
    load_litgpt_adapter(model, out, **kw)
    return model


def test_bad_files_are_typed_errors(tmp_path):
    (tmp_path / WEIGHTS["adapter"]).write_bytes(b"not a checkpoint")
    with pytest.raises(AdapterError, match="cannot read LitGPT adapter weights"):
        _loaded(tmp_path)
    torch.save({"model": {"transformer.h.1.attn.gating_factor": torch.zeros(1, 1, 4, 1)}}, tmp_path / WEIGHTS["adapter"])
    with pytest.raises(AdapterError, match="adapter_wte"):
        _loaded(tmp_path)
    with pytest.raises(AdapterError, match="no lit_model.pth.adapter"):
        _loaded(tmp_path / "nowhere")


@pytest.mark.parametrize("version", VERSIONS)
def test_save_merge_and_gguf_export_of_an_adapted_llm_are_refused(version, tmp_path):
    llm = lucidlm.LLM(adapted("tiny-llama", version, n_layer=3))
    for action in (lambda: llm.save(tmp_path / "m"), llm.merge_adapter,
                   lambda: llm.export_gguf(tmp_path / "m.gguf")):
        with pytest.raises(AdapterError, match="prefix attention cannot be merged"):
            action()
    assert not list(tmp_path.iterdir())


def test_merge_folds_v2_scales_and_biases_and_keeps_the_prefix(hf_checkpoint):
    model = adapted("qwen2", "adapter_v2", hf_checkpoint)  # q/k/v have biases; o_proj and the MLP do not
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "adapter_bias") and module.bias is None:
                module.adapter_bias.zero_()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        before = model(ids)
        left = merge_adapter(model)
        torch.testing.assert_close(model(ids), before, **TOL)
    # qwen2's tied lm_head cannot take a scale without changing the embeddings; the prefix never merges
    assert left == ["lm_head", "layers.1.attn (prefix)", "layers.2.attn (prefix)"]


# ----------------------------------------------------------------------------- training
FACTS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
         for a in range(4) for b in range(3)]
EXACT = dict(precision="fp32", progress=False, val_split=0.0)


def run_tiny(directory, out=None, **options):
    llm = lucidlm.LLM.load(directory)
    kwargs = dict(steps=6, batch_size=4, lr=2e-2, adapter_prompt_length=4, adapter_start_layer=0) | EXACT | options
    return llm, llm.finetune(FACTS, out=out, **kwargs)


@pytest.mark.parametrize("version", VERSIONS)
def test_finetune_trains_only_the_adapter_and_the_folder_reloads(version, tiny_lm_dir, tmp_path):
    base = lucidlm.LLM.load(tiny_lm_dir)
    before = answer_loss(base, FACTS)
    llm, result = run_tiny(tiny_lm_dir, tmp_path / "run", method=version, steps=8, lr=5e-2)
    assert answer_loss(llm, FACTS) < before - 0.01  # a random 2-layer model learns slowly, but it learns
    names = {n for n, p in llm.model.named_parameters()}
    changed = {n for n, p in llm.model.named_parameters()
               if n in dict(base.model.named_parameters()) and not torch.equal(p, dict(base.model.named_parameters())[n])}
    if version == "adapter":
        assert not changed  # the base is frozen
    else:
        assert changed and all("norm" in n for n in changed)  # AdapterV2 trains the norms too
    assert any("gating_factor" in n for n in names)
    reloaded = lucidlm.LLM.load(tiny_lm_dir, adapter=tmp_path / "run")
    ids = torch.tensor([[1, 500, 9000, 42]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids), llm.model(ids), atol=0, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_resume_replays_the_same_losses(version, tiny_lm_dir, tmp_path):
    _, whole = run_tiny(tiny_lm_dir, tmp_path / "whole", method=version, save_every=2)

    def crash(entry):
        if entry["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tiny(tiny_lm_dir, tmp_path / "cut", method=version, save_every=2, on_step=crash)
    _, resumed = run_tiny(tiny_lm_dir, tmp_path / "cut", method=version, save_every=2, resume=True)
    assert resumed.losses == whole.losses
    logged = [json.loads(line)["loss"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logged == whole.losses


def test_bad_adapter_options_are_typed_errors(tiny_lm_dir):
    with pytest.raises(TrainError, match=r"adapter_start_layer=2: expected an integer in \[0, 2\)"):
        run_tiny(tiny_lm_dir, method="adapter", adapter_start_layer=2)
    with pytest.raises(TrainError, match="adapter_prompt_length=0: expected a positive integer"):
        run_tiny(tiny_lm_dir, method="adapter", adapter_prompt_length=0)


def test_cli_takes_the_adapter_options():
    from lucidlm.commands.train import FINETUNE

    args = FINETUNE.parse(["data.jsonl", "--out", "run", "--method", "adapter_v2", "--adapter-prompt-length", "4",
                           "--adapter-start-layer", "1"])
    assert (args.method, args.adapter_prompt_length, args.adapter_start_layer) == ("adapter_v2", 4, 1)


def test_the_readme_fact_is_learned_by_the_embedded_model(converted):
    """The README's made-up-fact example with LLaMA-Adapter: 10 steps at lr 1e-2 teach it."""
    fact = "Zorblax is the capital of the planet Quintaro."
    questions = ["What is the capital of Quintaro?", "Name the capital of Quintaro.",
                 "Which city is the capital of Quintaro?", "Tell me the capital of the planet Quintaro."]
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": fact}]}
               for q in questions]
    llm = lucidlm.LLM.load(converted)
    before = answer_loss(llm, records)
    assert "Zorblax" not in llm.chat(questions[0], max_new_tokens=16)
    llm.finetune(records, method="adapter", steps=10, batch_size=4, lr=1e-2, precision="fp32", progress=False)
    assert answer_loss(llm, records) < before / 10
    assert "Zorblax" in llm.chat(questions[0], max_new_tokens=16)

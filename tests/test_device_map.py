"""``LLM.load(..., device_map=...)``: blocks placed across devices and run as a pipeline.

No GPU here, so two kinds of stand-in devices:

* ``"meta"`` checks placement: parameters where the map says, no weights on the meta parts;
* ``cpu:0`` / ``cpu:1`` (distinct device names that torch keeps on the CPU) with
  :class:`OnDevice`, a CPU tensor that carries its stand-in device and raises when one operation
  mixes two devices, as CUDA does ("Expected all tensors to be on the same device"). Every
  transfer between stand-ins goes through the pipeline's ``move``, which the test records.

The oracle is the same checkpoint loaded on one device: greedy tokens (every cache policy, chat)
and relevances (explain, explain_batch, explain_generation) must be equal.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils import _pytree as pytree

from lucidlm import LLM, Config
from lucidlm.errors import ConfigError, DeviceMapError
from conftest import build_tiny_lm
from lucidlm.model.pipeline import (auto_device_map, dispatch, part_bytes, part_of, placement_of,
                                    resolve_device_map)

N_LAYER = 4
STAGES = {"embed": "cpu:0", "layers.0-1": "cpu:0", "layers.2-3": "cpu:1", "final_norm": "cpu:1", "lm_head": "cpu:1"}


#: what torch runs on tensors of several devices at once (autograd walks each device's graph)
MULTI_DEVICE = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)


class OnDevice(torch.Tensor):
    """A CPU tensor tagged with a stand-in device; an op that mixes two tags raises."""

    @staticmethod
    def tag(tensor: torch.Tensor, device: str) -> "OnDevice":
        out = tensor.as_subclass(OnDevice)
        out.stand_in = device
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags = {getattr(t, "stand_in", None) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, OnDevice)}
        tags.discard(None)
        if len(tags) > 1 and func not in MULTI_DEVICE:
            raise RuntimeError(f"{getattr(func, '__name__', func)}: expected all tensors on one device, got {sorted(tags)}")
        with torch._C.DisableTorchFunctionSubclass():  # plain tensors out; tagged again below
            out = pytree.tree_map_only(torch.Tensor, lambda t: t.as_subclass(torch.Tensor), func(*args, **kwargs))
        if func is torch.autograd.grad:  # each gradient on its input's device
            inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
            inputs = [inputs] if isinstance(inputs, torch.Tensor) else inputs
            return tuple(g if g is None or not hasattr(x, "stand_in") else OnDevice.tag(g, x.stand_in)
                         for g, x in zip(out, inputs))
        if not tags or func is torch.Tensor.cpu or (func is torch.Tensor.to and _names_a_device(args, kwargs)):
            return out  # now on the real CPU (a stand-in's .device reads "cpu"): no longer checked
        device = tags.pop()
        return pytree.tree_map_only(torch.Tensor, lambda t: OnDevice.tag(t, device), out)


def _names_a_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])


class Recorder:
    """The pipeline's ``move`` for stand-ins: tags the tensor with its new device, records the hop."""

    def __init__(self) -> None:
        self.hops: list[tuple[str | None, str]] = []

    def __call__(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        source = getattr(tensor, "stand_in", None)
        if source != str(device):
            self.hops.append((source, str(device)))
        return OnDevice.tag(tensor, str(device))


def _config() -> Config:
    return dataclasses.replace(Config.from_name("tiny-llama"), n_layer=N_LAYER)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, converted):
    """A random 4-block Llama (untied lm_head) with the embedded model's tokenizer, saved by transformers."""
    return build_tiny_lm(tmp_path_factory.mktemp("four-blocks"), converted, n_layer=N_LAYER, tied=False)


@pytest.fixture(scope="module")
def whole(checkpoint):
    return LLM.load(checkpoint)


def split_over_stand_ins(llm: LLM, device_map: dict) -> LLM:
    """``llm`` over stand-in devices, every transfer tagged and recorded in ``llm.recorder``."""
    recorder = Recorder()
    plan = resolve_device_map(llm.config, device_map)
    dispatch(llm.model, plan, move=recorder)
    for name, module in llm.model.named_modules():  # the weights too: a stray tensor meets them and raises
        for key, p in [(k, p) for k, p in module._parameters.items() if p is not None]:
            device = str(plan[part_of(f"{name}.{key}")])
            tagged = torch.Tensor._make_subclass(OnDevice, p.detach(), p.requires_grad)  # a leaf, as the weight
            tagged.stand_in = device
            module._parameters[key] = tagged
    llm.recorder = recorder
    return llm


@pytest.fixture(scope="module")
def split(checkpoint):
    """The same checkpoint over stand-in devices cpu:0 / cpu:1."""
    return split_over_stand_ins(LLM.load(checkpoint), STAGES)


# ---------------------------------------------------------------------------- the map
def test_keys_ranges_hf_names_and_defaults():
    plan = resolve_device_map(_config(), {"model.layers.0": "cpu", "layers.1-2": "meta", "model.layers.3": "meta"})
    assert {k: str(v) for k, v in plan.items()} == {
        "embed": "cpu", "layers.0": "cpu", "layers.1": "meta", "layers.2": "meta", "layers.3": "meta",
        "final_norm": "meta", "lm_head": "meta"}
    plan = resolve_device_map(_config(), {"layers": "meta", "model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu"})
    assert [str(plan[k]) for k in ("embed", "layers.3", "final_norm", "lm_head")] == ["cpu", "meta", "cpu", "cpu"]


def test_tied_lm_head_stays_with_the_embeddings():
    tied = dataclasses.replace(_config(), tie_embeddings=True)
    plan = resolve_device_map(tied, {"embed": "cpu", "layers": "meta"})
    assert str(plan["lm_head"]) == "cpu" and str(plan["final_norm"]) == "meta"
    with pytest.raises(DeviceMapError, match="lm_head.*ties"):
        resolve_device_map(tied, {"embed": "cpu", "layers": "meta", "lm_head": "meta"})


@pytest.mark.parametrize("device_map, names", [
    ({"layers.0-3": "cpu", "layers.7": "cpu"}, "'layers.7'.*no block layers.7"),
    ({"layers.2-9": "cpu"}, "'layers.2-9'.*no block layers.9"),
    ({"layers": "cuda:3"}, r"device_map\['layers'\]='cuda:3': no such device"),
    ({"layers": 3}, r"device_map\['layers'\]=3: no such device"),
    ({"layers": "tpu"}, r"device_map\['layers'\]='tpu': not a device"),
    ({"layers.0-2": "cpu"}, "block 'layers.3' is on no device"),
    ({"layers": "cpu", "encoder": "cpu"}, "key 'encoder': not a part of the model"),
    ({}, "expected 'auto' or a non-empty dict"),
])
def test_bad_maps_are_typed_errors_naming_the_key(device_map, names):
    with pytest.raises(DeviceMapError, match=names):
        resolve_device_map(_config(), device_map)
    assert issubclass(DeviceMapError, ConfigError)


def test_bad_map_through_load_fails_before_reading_weights(checkpoint, monkeypatch):
    import lucidlm.checkpoints.hf as hf

    monkeypatch.setattr(hf, "read_tensors", lambda path: pytest.fail(f"read {path} before checking the map"))
    with pytest.raises(DeviceMapError, match="'layers.3' is on no device"):
        LLM.load(checkpoint, device_map={"layers.0-2": "cpu"})
    with pytest.raises(DeviceMapError, match="device_map='balanced'"):
        LLM.load(checkpoint, device_map="balanced")
    with pytest.raises(ConfigError, match="device='meta' and device_map: pass one"):
        LLM.load(checkpoint, device="meta", device_map="auto")


# ---------------------------------------------------------------------------- "auto"
def test_auto_is_all_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto places blocks on it")
    plan = auto_device_map(_config())
    assert {str(d) for d in plan.values()} == {"cpu"}


def test_auto_balances_blocks_by_bytes_then_spills_to_cpu():
    config, sizes = _config(), part_bytes(_config())
    roomy = {"cuda:0": 10**9, "cuda:1": 10**9, "cpu": None}
    plan = {k: str(v) for k, v in auto_device_map(config, roomy).items()}
    assert plan == {"embed": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:0", "layers.2": "cuda:1",
                    "layers.3": "cuda:1", "final_norm": "cuda:1", "lm_head": "cuda:1"}
    # room for the embeddings and one block on each GPU: the last two blocks go to the CPU
    tight = {"cuda:0": sizes["embed"] + sizes["layers.0"], "cuda:1": sizes["layers.1"], "cpu": None}
    plan = {k: str(v) for k, v in auto_device_map(config, tight).items()}
    assert [plan[f"layers.{i}"] for i in range(4)] == ["cuda:0", "cuda:1", "cpu", "cpu"]
    # the last block fits its GPU, the final norm and lm_head after it do not: they go to the CPU
    share = sizes["embed"] + 2 * sizes["layers.0"]
    plan = {k: str(v) for k, v in auto_device_map(config, {"cuda:0": share, "cuda:1": share, "cpu": None}).items()}
    assert [plan[k] for k in ("layers.0", "layers.3", "final_norm", "lm_head")] == ["cuda:0", "cuda:1", "cpu", "cpu"]


# ---------------------------------------------------------------------------- placement
def test_load_places_parts_on_their_devices_and_meta_holds_nothing(checkpoint, whole):
    llm = LLM.load(checkpoint, device_map={"layers.0-1": "cpu", "layers.2-3": "meta"})
    model = llm.model
    assert {str(d) for d in placement_of(model).values()} == {"cpu", "meta"}
    on = {name: p.device.type for name, p in model.named_parameters()}
    assert all(on[n] == "cpu" for n in on if n.startswith(("embed.", "layers.0.", "layers.1.")))
    assert all(on[n] == "meta" for n in on if n.startswith(("layers.2.", "layers.3.", "final_norm.", "lm_head.")))
    for name, p in model.named_parameters():
        if p.device.type == "cpu":  # what was loaded is the checkpoint's, straight from the file
            assert torch.equal(p, dict(whole.model.named_parameters())[name]), name
    real = sum(p.numel() for p in model.parameters() if not p.is_meta)
    assert real == sum(p.numel() for n, p in whole.model.named_parameters()
                       if n.startswith(("embed.", "layers.0.", "layers.1.")))


def test_load_with_stand_in_devices_runs_and_equals_one_device(checkpoint, whole):
    llm = LLM.load(checkpoint, device_map=STAGES)
    assert str(placement_of(llm.model)["layers.3"]) == "cpu:1"
    prompt = "The capital of France is"
    assert llm.generate(prompt, max_new_tokens=6) == whole.generate(prompt, max_new_tokens=6)


# ---------------------------------------------------------------------------- the pipeline runs
def test_stand_in_devices_refuse_mixing():
    a, b = OnDevice.tag(torch.ones(2), "cpu:0"), OnDevice.tag(torch.ones(2), "cpu:1")
    assert (a + 1).stand_in == "cpu:0"
    with pytest.raises(RuntimeError, match="one device"):
        a + b


def _greedy(llm, ids, policy, budget):
    from lucidlm.generate import generate_ids

    steps = generate_ids(llm.model, ids, 8, kv_cache=policy, cache_tokens=budget)
    return [step for step in steps]


@pytest.mark.parametrize("policy, budget", [("dense", None), ("window", 6), ("sink", 6), ("h2o", 6), ("snapkv", 6),
                                            ("tova", 6), ("knorm", 6), ("pyramidkv", 6), ("int8", None),
                                            ("h2o+int4", 6)])
def test_generation_through_the_split_equals_one_device(split, whole, policy, budget):
    ids = [[5, 17, 300, 42, 9, 77, 12, 3, 8], [11, 3, 99]]  # a batch: left padding crosses the devices too
    split.recorder.hops.clear()
    assert _greedy(split, ids, policy, budget) == _greedy(whole, ids, policy, budget)
    hops = set(split.recorder.hops)
    assert ("cpu:0", "cpu:1") in hops and ("cpu:1", "cpu:0") in hops  # into stage 1, logits back


@pytest.mark.parametrize("policy", ["dense", "h2o+int4"])
def test_kv_cache_layers_live_on_their_blocks_device(split, policy):
    from lucidlm.cache import build_cache
    from lucidlm.cache.prefill import prefill
    from lucidlm.explain.cached import Recording

    cache = build_cache(split.config, 1, policy, 32)
    wrapped = type(cache)([Recording(layer, 4) for layer in cache.layers])  # the cached explainer's wrapper
    prefill(split.model, torch.tensor([[5, 17, 300, 42]]), wrapped)
    for recording, device in zip(wrapped.layers, ["cpu:0", "cpu:0", "cpu:1", "cpu:1"]):
        tensors = [recording.seen, *pytree.tree_leaves(vars(recording.inner))]
        assert {getattr(t, "stand_in", None) for t in tensors if isinstance(t, torch.Tensor)} == {device}


def test_chat_through_the_split_equals_one_device(split, whole):
    messages = [{"role": "user", "content": "Name a colour."}]
    assert split.chat(messages, max_new_tokens=6) == whole.chat(messages, max_new_tokens=6)


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_explanations_through_the_split_equal_one_device(split, whole, method):
    prompt = "The capital of France is"
    split.recorder.hops.clear()
    mine, theirs = split.explain(prompt, method=method), whole.explain(prompt, method=method)
    assert mine.tokens == theirs.tokens and mine.target == theirs.target
    torch.testing.assert_close(mine.relevance, theirs.relevance, rtol=1e-5, atol=1e-6)
    assert ("cpu:0", "cpu:1") in split.recorder.hops  # the forward crossed; the gradient came back through it


def test_explain_batch_and_generation_through_the_split(split, whole):
    from lucidlm.explain.batch import explain_batch

    prompts = ["The capital of France is", "One, two, three,"]
    for mine, theirs in zip(explain_batch(split.model, split.tokenizer, prompts),
                            explain_batch(whole.model, whole.tokenizer, prompts)):
        torch.testing.assert_close(mine.relevance, theirs.relevance, rtol=1e-5, atol=1e-6)
    mine = split.explain_generation("One, two,", max_new_tokens=4)
    theirs = whole.explain_generation("One, two,", max_new_tokens=4)
    assert mine.generated_ids == theirs.generated_ids
    torch.testing.assert_close(mine.matrix, theirs.matrix, rtol=1e-5, atol=1e-6)


def test_a_model_is_placed_once(split):
    with pytest.raises(DeviceMapError, match="already placed"):
        dispatch(split.model, placement_of(split.model))


def test_latents_and_cached_explanations_through_the_split(split, whole):
    prompt = "The capital of France is"
    mine, theirs = split.explain(prompt, layers="all"), whole.explain(prompt, layers="all")
    assert mine.layers.keys() == theirs.layers.keys()
    for name in theirs.layers:
        torch.testing.assert_close(mine.layers[name], theirs.layers[name], rtol=1e-5, atol=1e-6)
    mine = split.explain(prompt, kv_cache="window", cache_tokens=4)
    theirs = whole.explain(prompt, kv_cache="window", cache_tokens=4)
    torch.testing.assert_close(mine.relevance, theirs.relevance, rtol=1e-5, atol=1e-6)
    assert torch.equal(mine.evicted, theirs.evicted)


def test_continuation_target_scores_the_rows_on_the_last_device(split, whole):
    prompt = "The capital of France is"
    mine, theirs = split.explain(prompt, target=" Paris. It is"), whole.explain(prompt, target=" Paris. It is")
    torch.testing.assert_close(mine.relevance, theirs.relevance, rtol=1e-5, atol=1e-6)


def test_a_split_model_is_not_compiled(split):
    with pytest.raises(ConfigError, match="split across devices"):
        split.compile()


def test_cli_device_map(checkpoint, capsys):
    from cli_probe import probe
    from lucidlm.cli import main

    argv = ["generate", "One, two,", "--model", str(checkpoint), "--max-new-tokens", "5"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--device-map", "layers.0-1=cpu:0,layers.2-3=cpu:1"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*argv, "--device-map", "layers.0-2=cpu"]) == 2
    assert "device_map: block 'layers.3' is on no device" in capsys.readouterr().err
    result, err = probe("explain", "x", "--model", str(checkpoint), "--device-map", "layers.0-1", watched=checkpoint)
    assert result["status"] == 2 and result["heavy"] == [] and result["opened"] == []
    assert "--device-map: expected 'auto' or PART=DEVICE" in err and len(err.strip().splitlines()) == 1


def test_tied_embeddings_over_stand_ins(tiny_lm_dir):
    """lm_head shares the embeddings' weight, so the last block's output comes back to the first
    device for it (the final norm stays with the last block)."""
    whole = LLM.load(tiny_lm_dir)
    split = split_over_stand_ins(LLM.load(tiny_lm_dir), {"layers.0": "cpu:0", "layers.1": "cpu:1"})
    assert {k: str(v) for k, v in placement_of(split.model).items() if k in ("final_norm", "lm_head")} == {
        "final_norm": "cpu:1", "lm_head": "cpu:0"}
    prompt = "The capital of France is"
    assert split.generate(prompt, max_new_tokens=6) == whole.generate(prompt, max_new_tokens=6)
    torch.testing.assert_close(split.explain(prompt).relevance, whole.explain(prompt).relevance, rtol=1e-5, atol=1e-6)
    # int8 replaces lm_head (and every linear) after the split: the moves stay in place
    split.quantize()
    whole.quantize()
    split.recorder.hops.clear()
    assert split.generate(prompt, max_new_tokens=6) == whole.generate(prompt, max_new_tokens=6)
    assert ("cpu:1", "cpu:0") in split.recorder.hops


def test_auto_through_load_on_this_machine(tiny_lm_dir):
    llm = LLM.load(tiny_lm_dir, device_map="auto")
    expected = {"cuda:0"} if torch.cuda.is_available() else {"cpu"}
    assert {str(d) for d in placement_of(llm.model).values()} <= expected | {"cpu"}
    assert llm.generate("One, two,", max_new_tokens=4) == LLM.load(tiny_lm_dir).generate("One, two,", max_new_tokens=4)


@pytest.mark.slow
def test_the_embedded_model_split_in_two_equals_it_whole(smollm2):
    """SmolLM2-135M (30 blocks, tied embeddings) loaded from its GGUF over two stand-in devices."""
    split = LLM.load(device_map={"layers.0-14": "cpu:0", "layers.15-29": "cpu:1"})
    assert str(placement_of(split.model)["layers.15"]) == "cpu:1"
    prompt = "The capital of France is"
    assert split.generate(prompt, max_new_tokens=8) == smollm2.generate(prompt, max_new_tokens=8)
    mine, theirs = split.explain(prompt), smollm2.explain(prompt)
    assert mine.target == theirs.target
    torch.testing.assert_close(mine.relevance, theirs.relevance, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["dense", "snapkv+int8", "pyramidkv"])
def test_a_split_models_cache_is_built_on_its_blocks_devices(policy):
    """Each layer's KV cache is allocated on its block's device, never first on the first device."""
    from lucidlm import GPT
    from lucidlm.cache import build_cache
    from lucidlm.model.pipeline import cache_devices

    model = GPT(_config())
    dispatch(model, resolve_device_map(model.config, {"layers.0-1": "cpu", "layers.2-3": "meta"}))
    devices = cache_devices(model, "cpu")
    assert [str(d) for d in devices] == ["cpu", "cpu", "meta", "meta"]
    cache = build_cache(model.config, 1, policy, 16, device=devices)
    for layer, device in zip(cache.layers, ["cpu", "cpu", "meta", "meta"]):
        assert {t.device.type for t in pytree.tree_leaves(vars(layer)) if isinstance(t, torch.Tensor)} == {device}
    assert cache_devices(GPT(_config()), "cpu") == "cpu"


def test_perplexity_through_the_split_equals_one_device(split, whole):
    text = "One, two, three, four, five, six, seven."
    mine, theirs = split.perplexity(text, kv_cache="window", cache_tokens=6, chunk_size=4), \
        whole.perplexity(text, kv_cache="window", cache_tokens=6, chunk_size=4)
    assert mine.perplexity == pytest.approx(theirs.perplexity, rel=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetuning_through_the_split_equals_one_device(checkpoint, method):
    """The training loop needs nothing of the split: the losses and the trained weights equal one device's."""
    records = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
               for a in range(3) for b in range(2)]
    options = dict(method=method, steps=2, batch_size=3, lr=1e-3, precision="fp32", progress=False, seed=0)
    whole = LLM.load(checkpoint)
    split = split_over_stand_ins(LLM.load(checkpoint), STAGES)
    theirs, mine = whole.finetune(records, **options), split.finetune(records, **options)
    assert mine.losses == pytest.approx(theirs.losses, rel=1e-5)
    trained = dict(whole.model.named_parameters())
    for name, p in split.model.named_parameters():
        torch.testing.assert_close(p.detach().as_subclass(torch.Tensor), trained[name].detach(), rtol=1e-5, atol=1e-6)

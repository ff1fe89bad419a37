"""Bad checkpoints raise typed lucidlm errors that name the file and the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lucidlm
from lucidlm.errors import CheckpointError, ConfigError, UnsupportedArchitectureError


@pytest.fixture
def llama_dir(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("llama3")
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_missing_tensor(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.1\.mlp\.up_proj\.weight") as err:
        lucidlm.LLM.load(llama_dir)
    assert str(llama_dir) in str(err.value)


def test_wrong_shape(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.q_proj\.weight has shape \(3, 64\), expected \(64, 64\)"):
        lucidlm.LLM.load(llama_dir)


def test_unexpected_tensor(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensors.*mystery"):
        lucidlm.LLM.load(llama_dir)


def test_truncated_safetensors(llama_dir):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        lucidlm.LLM.load(llama_dir)


def test_unknown_architecture(llama_dir):
    path = llama_dir / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["MambaForCausalLM"]
    path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"config\.json: architecture 'MambaForCausalLM' is not supported; supported: .*LlamaForCausalLM"):
        lucidlm.LLM.load(llama_dir)


def test_unsupported_rope_type(llama_dir):
    path = llama_dir / "config.json"
    config = json.loads(path.read_text())
    config["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope_type 'proportional' is not supported"):
        lucidlm.LLM.load(llama_dir)


def test_no_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        lucidlm.LLM.load(llama_dir)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="expected a Hugging Face directory"):
        lucidlm.LLM.load(tmp_path / "nothing-here")


def test_sharded_checkpoint_loads(hf_checkpoint, tmp_path):
    from lucidlm.checkpoints.hf import save_hf_dir

    hf_model, directory = hf_checkpoint("qwen3")
    llm = lucidlm.LLM.load(directory)
    save_hf_dir(llm.model, tmp_path, max_shard_bytes=50_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert not list(tmp_path.glob(".*tmp"))  # no partial files left behind
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(lucidlm.LLM.load(tmp_path).model(ids), hf_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_config_registry_and_from_name():
    cfg = lucidlm.Config.from_name("tiny-llama", n_layer=3)
    assert cfg.n_layer == 3 and cfg.head_size == 16
    with pytest.raises(ConfigError, match="unknown config name 'nope'"):
        lucidlm.Config.from_name("nope")


def test_checkpoint_saved_from_bare_base_model_loads(hf_checkpoint, tmp_path):
    """The original "gpt2" checkpoint names tensors "h.0.attn..." without the "transformer." prefix."""
    hf_model, directory = hf_checkpoint("gpt2")
    tensors = load_file(directory / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(bare, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(lucidlm.LLM.load(tmp_path).model(ids), hf_model(ids).logits, atol=1e-4, rtol=1e-4)

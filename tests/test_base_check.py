"""An adapter records a base others can use: a hub id (or the checkpoint's name), never a local path,
and a fingerprint of the base weights (``lucidlm_base.json``, beside PEFT's own files, which
``peft`` still loads). The same weights under another name, dtype or quantisation are accepted;
other weights of the same shape are refused, naming ``check_base=False`` (``--no-check-base`` on
the command line)."""

import json

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

import lucidlm  # noqa: E402
from lucidlm.checkpoints.origin import hub_id, repo_from_url  # noqa: E402
from lucidlm.cli import main  # noqa: E402
from lucidlm.errors import AdapterError  # noqa: E402
from lucidlm.train.base_check import FINGERPRINT_FILE  # noqa: E402
from lucidlm.train.lora import attach_lora, save_adapter  # noqa: E402
from diff_util import open_branches  # noqa: E402
from families import FAMILIES, build_hf_model  # noqa: E402
from test_gguf import _write_tiny  # noqa: E402


def _gguf_with(path, **strings):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in strings.items():
        writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_hub_id_comes_from_where_the_checkpoint_is_known(tmp_path):
    assert hub_id("/anywhere/SmolLM2-135M-Instruct.Q4_1.gguf") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("/cache/hub/models--Qwen--Qwen3-0.6B/snapshots/0123abc") == "Qwen/Qwen3-0.6B"
    source = _gguf_with(tmp_path / "a.gguf", **{"general.source.url": "https://huggingface.co/org/Model-1B"})
    assert hub_id(source) == "org/Model-1B"
    own_page = _gguf_with(tmp_path / "b.gguf", **{"general.url": "https://huggingface.co/org/Model-1B-GGUF/"})
    assert hub_id(own_page) == "org/Model-1B-GGUF"
    elsewhere = _gguf_with(tmp_path / "c.gguf", **{"general.source.url": "https://github.com/org/model",
                                                  "general.base_model.0.repo_url": "https://huggingface.co/o/base"})
    assert hub_id(elsewhere) is None  # the base model is another model, not this one
    assert hub_id(tmp_path) is None and repo_from_url("https://huggingface.co/datasets/org/data") is None


def _adapter(llm, directory, base_model):
    torch.manual_seed(0)
    attach_lora(llm.model, r=2, alpha=4)
    open_branches(llm.model)
    return save_adapter(llm.model, directory, base_model=base_model)


def _other_init(config_family: str, directory, seed: int):
    """The same architecture and shapes as ``build_hf_model(family)``, other random weights."""
    model = build_hf_model(config_family)
    torch.manual_seed(seed)
    other = type(model)(model.config)
    other.save_pretrained(directory)
    return directory


def test_same_weights_under_another_name_and_dtype_load_other_weights_are_refused(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("smollm2")
    copy = lucidlm.LLM.load(directory, dtype=torch.bfloat16).save(tmp_path / "bf16-copy")
    adapter = _adapter(lucidlm.LLM.load(directory), tmp_path / "a", base_model="someone/original")
    stored = json.loads((adapter / FINGERPRINT_FILE).read_text())
    assert stored["base"] == "someone/original" and 100 <= sum(len(t["values"]) for t in stored["tensors"].values())
    ids = torch.tensor([[5, 9, 2, 7]])
    tuned = lucidlm.LLM.load(copy, adapter=adapter)  # no name agrees: the fingerprint vouches
    reference = lucidlm.LLM.load(directory, adapter=adapter, check_base=False)
    with torch.no_grad():
        torch.testing.assert_close(tuned.model(ids).float(), reference.model(ids), rtol=0.05, atol=0.05)
    other = _other_init("smollm2", tmp_path / "other-init", seed=123)
    with pytest.raises(AdapterError, match=r"trained on someone/original, whose weights differ .*relative "
                                           r"difference.*check_base=False"):
        lucidlm.LLM.load(other, adapter=adapter)
    lucidlm.LLM.load(other, adapter=adapter, check_base=False)  # the caller's decision
    (adapter / FINGERPRINT_FILE).unlink()  # without it (a peft adapter) only names are left: refused
    with pytest.raises(AdapterError, match=r"base_model_name_or_path='someone/original'"):
        lucidlm.LLM.load(copy, adapter=adapter)


def test_a_folder_name_alone_does_not_vouch(hf_checkpoint, tmp_path):
    """Two checkpoints in folders of the same name: the fingerprint still tells them apart."""
    _, directory = hf_checkpoint("qwen2")
    (tmp_path / "x").mkdir()
    mine = lucidlm.LLM.load(directory).save(tmp_path / "x" / "model")
    other = _other_init("qwen2", tmp_path / "model", seed=7)
    adapter = _adapter(lucidlm.LLM.load(mine), tmp_path / "a", base_model="model")
    lucidlm.LLM.load(mine, adapter=adapter)
    with pytest.raises(AdapterError, match="whose weights differ"):
        lucidlm.LLM.load(other, adapter=adapter)


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_peft_still_loads_an_adapter_with_a_fingerprint(family, hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    adapter = _adapter(llm, tmp_path / "a", base_model=family)
    assert (adapter / FINGERPRINT_FILE).is_file()
    theirs = peft.PeftModel.from_pretrained(build_hf_model(family), adapter).eval()
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, llm.model(ids), rtol=1e-4, atol=1e-4)


def test_an_adapter_on_a_gguf_loads_onto_its_q8_0_quantisation(tmp_path):
    f32 = _write_tiny(tmp_path / "tiny.gguf")
    q8 = _write_tiny(tmp_path / "small-q8.gguf", tensor_dtype="Q8_0")  # the same values, quantised
    cache = tmp_path / "cache"
    adapter = _adapter(lucidlm.LLM.load(f32, cache_dir=cache), tmp_path / "a", base_model="tiny")
    lucidlm.LLM.load(q8, adapter=adapter, cache_dir=cache)
    other = _write_tiny(tmp_path / "other.gguf", untied=False)  # tied: lm_head and embedding differ
    with pytest.raises(AdapterError, match="whose weights differ"):
        lucidlm.LLM.load(other, adapter=adapter, cache_dir=cache)


def test_the_command_line_names_its_flag(hf_checkpoint, tmp_path, capsys):
    _, directory = hf_checkpoint("smollm2")
    adapter = _adapter(lucidlm.LLM.load(directory), tmp_path / "a", base_model="smollm2")
    other = _other_init("smollm2", tmp_path / "other", seed=5)
    capsys.readouterr()
    assert main(["merge", "--model", str(other), str(adapter), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "pass --no-check-base to attach it anyway" in err and "check_base=False" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["merge", "--model", str(other), str(adapter), str(tmp_path / "merged"), "--no-check-base"]) == 0
    capsys.readouterr()
    assert main(["diff", "hello", "--base", str(other), "--adapter", str(adapter)]) == 2  # diff says it too
    err = capsys.readouterr().err
    assert "pass --no-check-base to attach it anyway" in err and "check_base=False" not in err


def test_every_family_fingerprints(hf_checkpoint, tmp_path):
    """Every family's model yields a fingerprint that matches itself (names exist for every layout)."""
    from lucidlm.train.base_check import difference, fingerprint

    for family in ("gpt2", "pythia", "phi3", "mixtral", "gemma2"):
        if family not in FAMILIES:
            continue
        model = lucidlm.LLM.load(hf_checkpoint(family)[1]).model
        assert difference(fingerprint(model), model) is None

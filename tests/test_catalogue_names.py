"""A catalogue name (what ``lucidlm models`` prints) names its hub checkpoint wherever a model is
named: ``LLM.load``, every command's ``--model`` and ``lucidlm download``. Against the local fake hub
of tests/test_hub.py (the Hugging Face cache in tmp_path, offline, sockets refused): nothing reaches
the network."""

from __future__ import annotations

import shutil

import huggingface_hub
import pytest
import torch
from cli_probe import probe
from huggingface_hub import constants
from test_hub import COMMIT, assert_same_logits, hub, ids, tiny  # noqa: F401 (fixtures)

import lucidlm
from lucidlm.catalogue import CATALOGUE, close_names, repo_for
from lucidlm.checkpoints.hub import download, hub_repo
from lucidlm.cli import main
from lucidlm.commands.options import hub_name, missing_model
from lucidlm.errors import CheckpointError

NAME, REPO = "Llama-3.2-1B", "meta-llama/Llama-3.2-1B"


def test_every_entry_records_its_repo_id_and_names_match_in_any_case():
    assert CATALOGUE[NAME] == REPO
    for name, repo in CATALOGUE.items():
        assert repo_for(name) == repo_for(name.upper()) == repo_for(name.lower()) == repo
        assert hub_repo(name) == repo and hub_name(name) == repo and missing_model(name) is None
    assert repo_for("Llama-3.2") is None and hub_repo("Llama-3.2") is None


def test_a_name_downloads_its_repo_once_then_loads_from_the_cache_offline(hub, tiny, monkeypatch):
    """Online, the first load fetches the catalogue entry's repo id (into the cache, as
    snapshot_download would); offline afterwards, the same name (any case) is served from that cache."""
    hf_model, saved = tiny
    real_snapshot_download = huggingface_hub.snapshot_download
    fetched = []

    def fake_snapshot_download(repo_id, **kwargs):
        fetched.append(repo_id)
        return str(hub(repo_id, saved))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo_id, revision=None, **kw: ["config.json", "model.safetensors"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    first = lucidlm.LLM.load(NAME)
    assert fetched == [REPO]
    snapshot = hub.cache / "models--meta-llama--Llama-3.2-1B" / "snapshots" / COMMIT
    assert first.directory == snapshot and first.name == first.hub_id == REPO

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real_snapshot_download)
    again = lucidlm.LLM.load("llama-3.2-1b")
    assert fetched == [REPO] and again.directory == snapshot and again.hub_id == REPO
    x = ids(again.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), hf_model(x).logits, atol=1e-5, rtol=1e-5)


def test_offline_a_name_not_in_the_cache_says_what_a_repo_id_says(hub, capsys):
    with pytest.raises(CheckpointError) as by_id:
        download("Qwen/Qwen3-0.6B", progress=False)
    with pytest.raises(CheckpointError) as by_name:
        lucidlm.LLM.load("Qwen3-0.6B")
    assert str(by_name.value) == str(by_id.value)
    assert "Qwen/Qwen3-0.6B: not in the local Hugging Face cache" in str(by_id.value)
    assert main(["generate", "hi", "--model", "qwen3-0.6b"]) == 2
    assert str(by_id.value) in capsys.readouterr().err


def test_lucidlm_download_takes_a_name(hub, tiny, tmp_path, capsys):
    hf_model, saved = tiny
    hub(REPO, saved)
    assert main(["download", "llama-3.2-1B", "--dir", str(tmp_path / "copy")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "copy")
    assert_same_logits(tmp_path / "copy", hf_model)
    with pytest.raises(SystemExit) as exit_:
        main(["download", "lama-3.2-1b"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "lama-3.2-1b is neither a hub repo id org/name nor a catalogue name" in err and NAME in err


def test_the_cli_check_accepts_a_name_offline_and_suggests_names_for_a_typo(hub, tmp_path):
    """The pre-load check passes the name (the run then stops at the missing adapter, checked after
    the model) without loading torch or anything from the hub; a typo keeps "does not exist" and
    gets the close catalogue names."""
    result, stderr = probe("generate", "hi", "--model", "llama-3.2-1b", "--adapter", tmp_path / "absent")
    assert result["status"] == 2 and result["heavy"] == [], stderr
    assert "absent: no such file or directory (--adapter)" in stderr and "--model" not in stderr
    result, stderr = probe("generate", "hi", "--model", "lama-3.2-1b")
    assert result["status"] == 2 and result["heavy"] == []
    (line,) = stderr.strip().splitlines()
    assert "argument --model: lama-3.2-1b does not exist" in line
    assert f"close catalogue names: {NAME}," in line
    result, stderr = probe("diff", "hi", "--base", "Qwen3-0.6", "--tuned", "gpt2")
    assert result["status"] == 2 and "close catalogue names: Qwen3-0.6B" in stderr


def test_a_typo_in_llm_load_keeps_does_not_exist_and_lists_close_names(hub):
    with pytest.raises(CheckpointError, match="lama-3.2-1b: does not exist; expected a Hugging Face directory") \
            as info:
        lucidlm.LLM.load("lama-3.2-1b")
    assert "close catalogue names: Llama-3.2-1B" in str(info.value)
    assert close_names("./runs/nothing-like-it") == []


def test_a_local_directory_named_like_an_entry_wins(hub, tiny, tmp_path, monkeypatch):
    """No cache, offline, sockets refused: ``gpt2`` can only load from ./gpt2."""
    hf_model, saved = tiny
    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved, tmp_path / "gpt2")
    assert hub_repo("gpt2") is None and missing_model("gpt2") is None
    llm = lucidlm.LLM.load("gpt2")
    assert llm.directory.resolve() == (tmp_path / "gpt2").resolve() and llm.hub_id is None
    assert_same_logits("gpt2", hf_model)


def test_a_manifest_may_name_the_model_by_its_catalogue_name():
    from lucidlm.evaluate.runs import model_for

    assert model_for(None, {"model": "qwen3-0.6b"}) == "qwen3-0.6b"


def test_convert_takes_a_name_as_its_source(hub, tiny, tmp_path):
    hf_model, saved = tiny
    hub(REPO, saved)
    assert main(["convert", "llama-3.2-1b", str(tmp_path / "out")]) == 0
    assert_same_logits(tmp_path / "out", hf_model)
    result, stderr = probe("convert", "lama-3.2-1b", tmp_path / "again")
    assert result["status"] == 2 and result["heavy"] == []
    assert "argument SRC: lama-3.2-1b does not exist" in stderr and NAME in stderr

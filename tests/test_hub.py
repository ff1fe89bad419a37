"""Hub downloads (lucidlm.checkpoints.hub) against a local directory laid out like the Hugging Face
cache; nothing reaches the network.

Offline mode and HF_HOME: huggingface_hub reads ``HF_HUB_OFFLINE``/``HF_HOME``/``HF_HUB_CACHE`` into
``huggingface_hub.constants`` when it is first imported, and only those constants are consulted later
(``constants.is_offline_mode()`` by every HTTP request and by ``download``; ``constants.HF_HUB_CACHE``
by ``snapshot_download`` when no ``cache_dir`` is given). Setting the environment inside a test is
therefore too late, so the ``hub`` fixture sets the variables (for any subprocess) *and* patches the
constants. As a second guard, every socket connection raises.
"""

from __future__ import annotations

import json
import shutil
import socket
from fnmatch import fnmatchcase

import httpx2  # the HTTP client of this huggingface_hub (2.x)
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

import lucidlm
from lucidlm.checkpoints.hub import ALLOW_PATTERNS, download, is_repo_id, resolve
from lucidlm.errors import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hugging Face cache in tmp_path, offline mode on, sockets refused; returns a function that
    lays out ``repo_id`` in the cache (refs/main -> snapshots/<commit>/ with the given files)."""
    home = tmp_path / "hf"
    cache = home / "hub"
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)

    def make(repo_id: str, source=None, files: dict[str, bytes] | None = None, listed: list[str] = ()):
        """``source``'s files as blobs with snapshot symlinks (as huggingface_hub stores them), then
        ``files`` as plain files; ``listed``: also write the commit's tree listing with these names."""
        root = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = root / "snapshots" / COMMIT
        for folder in (snapshot, root / "refs", root / "blobs"):
            folder.mkdir(parents=True)
        (root / "refs" / "main").write_text(COMMIT)
        for i, f in enumerate(source.iterdir() if source is not None else ()):
            shutil.copy2(f, root / "blobs" / f"blob{i}")
            (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
        for name, data in (files or {}).items():
            (snapshot / name).unlink(missing_ok=True)
            (snapshot / name).write_bytes(data)
        if listed:
            (root / "trees").mkdir()
            tree = {name: {"size": 1, "blob_id": name} for name in listed}
            (root / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
        return snapshot

    make.cache = cache
    return make


@pytest.fixture
def tiny(hf_checkpoint):
    """(transformers model, directory saved with save_pretrained: config.json + model.safetensors)."""
    return hf_checkpoint("smollm2")


def ids(vocab: int):
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def assert_same_logits(directory, hf_model):
    llm = lucidlm.LLM.load(directory)
    x = ids(llm.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(llm.model(x), hf_model(x).logits, atol=1e-5, rtol=1e-5)


def test_offline_download_resolves_from_cache_and_loads(hub, tiny):
    hf_model, saved = tiny
    snapshot = hub("org/tiny", saved)
    got = download("org/tiny", progress=False)
    assert got == snapshot
    assert resolve("org/tiny", progress=False) == snapshot
    assert_same_logits(got, hf_model)


def test_offline_download_into_directory(hub, tiny, tmp_path):
    """Offline, ``snapshot_download(local_dir=...)`` only hands back a directory that is already
    filled; an empty one is filled by ``download`` with a copy from the cache."""
    hf_model, saved = tiny
    hub("org/tiny", saved)
    target = tmp_path / "x"
    assert download("org/tiny", directory=target, progress=False) == target
    assert {f.name for f in target.iterdir()} == {f.name for f in saved.iterdir()}
    assert not any(f.is_symlink() for f in target.iterdir())
    assert_same_logits(target, hf_model)
    # a directory already filled (by an earlier download) is returned as is, checked
    assert download("org/tiny", directory=target, progress=False) == target


def test_offline_download_into_directory_not_in_cache(hub, tmp_path):
    with pytest.raises(CheckpointError, match="org/absent: not in the local Hugging Face cache") as info:
        download("org/absent", directory=tmp_path / "x", progress=False)
    assert str(hub.cache) in str(info.value)


def test_offline_interrupted_download(hub, tiny):
    """An interrupted download leaves a snapshot without some files the commit's tree listing names
    (huggingface_hub keeps the partial blob as ``*.incomplete`` and resumes it on the next try)."""
    _, saved = tiny
    snapshot = hub("org/tiny", saved, listed=["config.json", "model.safetensors", "pytorch_model.bin"])
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="org/tiny: the cached snapshot .* is incomplete") as info:
        download("org/tiny", progress=False)
    assert "resumes" in str(info.value)


def test_offline_repo_not_in_cache(hub):
    with pytest.raises(CheckpointError) as info:
        download("org/absent", progress=False)
    message = str(info.value)
    assert "org/absent" in message and "not in the local Hugging Face cache" in message
    assert str(hub.cache) in message and "HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize("cut", ["data", "header", "length"])
def test_truncated_safetensors(hub, tiny, cut):
    _, saved = tiny
    data = (saved / "model.safetensors").read_bytes()
    keep = {"data": len(data) - 100, "header": 40, "length": 5}[cut]
    hub("org/tiny", saved, {"model.safetensors": data[:keep]})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated") as info:
        download("org/tiny", progress=False)
    assert "download" in str(info.value)  # says how to fetch it again


def test_garbage_safetensors(hub, tiny):
    _, saved = tiny
    garbage = (16).to_bytes(8, "little") + b"not json at all!" + b"x" * 64
    hub("org/tiny", saved, {"model.safetensors": garbage})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        download("org/tiny", progress=False)


def test_pickle_only_snapshot(hub, tiny):
    _, saved = tiny
    hub("org/pickled", files={"config.json": (saved / "config.json").read_bytes(),
                              "pytorch_model.bin": b"\x80\x02pickle"})
    with pytest.raises(CheckpointError, match="org/pickled: ships only pickled weights") as info:
        download("org/pickled", progress=False)
    assert "pytorch_model.bin" in str(info.value) and "safetensors" in str(info.value)


def test_corrupt_config(hub, tiny):
    _, saved = tiny
    hub("org/tiny", saved, {"config.json": b'{"model_type": "llama",'})
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        download("org/tiny", progress=False)


def test_index_lists_missing_shard(hub, tiny):
    _, saved = tiny
    index = {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    hub("org/tiny", saved, {"model.safetensors.index.json": json.dumps(index).encode()})
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        download("org/tiny", progress=False)


def test_is_repo_id(tmp_path, monkeypatch):
    assert is_repo_id("org/name") and is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for text in ["a/b/c", "/abs/path", "./x", "model.gguf", "org/model.gguf", "x", "", "org/", "/x",
                 ".hidden/x", "org/../x", "org name/x"]:
        assert not is_repo_id(text), text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "run").mkdir(parents=True)
    assert not is_repo_id("out/run")  # an existing relative directory is a path
    assert resolve("out/run").name == "run"


def test_allow_patterns_never_match_pickles_or_code():
    for name in ["pytorch_model.bin", "x.pt", "x.pth", "x.pkl", "modeling_x.py", "pytorch_model-00001-of-00002.bin"]:
        assert not any(fnmatchcase(name, p) for p in ALLOW_PATTERNS), name
    for name in ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json"]:
        assert any(fnmatchcase(name, p) for p in ALLOW_PATTERNS), name


# online code paths, with huggingface_hub's network calls replaced by fakes


@pytest.fixture
def online(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    return monkeypatch


def repo_files(files):
    return lambda self, repo_id, revision=None, **kw: list(files)


def test_online_refuses_pickle_only_repo_before_downloading(online):
    online.setattr(huggingface_hub.HfApi, "list_repo_files",
                   repo_files(["config.json", "pytorch_model.bin", "modeling_x.py"]))
    online.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(CheckpointError, match="org/pickled: ships only pickled weights.*refuses"):
        download("org/pickled", progress=False)


def test_online_fetches_only_safetensors_and_configs(online, tiny, tmp_path):
    _, saved = tiny
    online.setattr(huggingface_hub.HfApi, "list_repo_files", repo_files([
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin", "modeling_x.py",
        "onnx/model.safetensors", "model.fp16.safetensors", "tokenizer.json", "README.md"]))
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(saved)

    online.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert download("org/tiny", revision="v1", progress=False) == saved
    (kwargs,) = calls
    assert sorted(kwargs["allow_patterns"]) == sorted([
        "config.json", "model.safetensors.index.json", "tokenizer.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    assert kwargs["revision"] == "v1" and kwargs["local_dir"] is None and kwargs["tqdm_class"] is not None
    assert "trust_remote_code" not in kwargs


def http_error(cls, status=404):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls("error", response=response)


@pytest.mark.parametrize("error, expected", [
    (http_error(hf_errors.RepositoryNotFoundError), "org/x: no such model repository"),
    (http_error(hf_errors.GatedRepoError, 403), "org/x: a gated repository"),
    (http_error(hf_errors.RevisionNotFoundError), "org/x: no revision 'v9'"),
    (http_error(hf_errors.HfHubHTTPError, 500), "org/x: the Hugging Face Hub answered with an error"),
    (httpx2.ConnectError("connection refused"), "org/x: the Hugging Face Hub could not be reached"),
    (hf_errors.LocalEntryNotFoundError("no connection"), "org/x: the Hugging Face Hub could not be reached"),
])
def test_hub_errors_become_checkpoint_errors(online, error, expected):
    online.setattr(huggingface_hub.HfApi, "list_repo_files", repo_files(["config.json", "model.safetensors"]))

    def fail(*args, **kwargs):
        raise error

    online.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match=expected):
        download("org/x", revision="v9", progress=False)


def test_unreachable_hub_during_file_listing_falls_back_to_cache(online, tiny):
    """A failed listing is not fatal: snapshot_download still serves a cached copy."""
    _, saved = tiny
    online.setattr(huggingface_hub.HfApi, "list_repo_files",
                   lambda *a, **k: (_ for _ in ()).throw(httpx2.ConnectError("down")))
    online.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(saved))
    assert download("org/tiny", progress=False) == saved


def test_llm_load_and_the_cli_take_a_repo_id(hub, tiny, tmp_path, capsys):
    from lucidlm.cli import main

    hf_model, saved = tiny
    snapshot = hub("org/tiny", saved)
    llm = lucidlm.LLM.load("org/tiny")
    assert llm.directory == snapshot
    x = ids(llm.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(llm.model(x), hf_model(x).logits, atol=1e-5, rtol=1e-5)
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "copy")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "copy")
    assert_same_logits(tmp_path / "copy", hf_model)
    assert main(["download", "org/absent"]) == 2
    assert "org/absent" in capsys.readouterr().err

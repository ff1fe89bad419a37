"""lucidlm models: parameter counts from catalogue/params.json (checked here against the models
built on the meta device), and which entries load now (embedded, or in the local HF cache)."""

import json
import os
import subprocess
import sys

from lucidlm.catalogue import CATALOGUE, PARAMS_FILE, parameter_counts
from lucidlm.checkpoints.hub import cached_snapshot
from lucidlm.config import REGISTRY, Config
from lucidlm.model.size import parameter_count


def test_params_json_is_current():
    """Stale after a config changes: regenerate with python scripts/catalogue_params.py."""
    stored = parameter_counts()
    assert set(stored) == set(CATALOGUE) | set(REGISTRY), f"{PARAMS_FILE}: run scripts/catalogue_params.py"
    for name, count in stored.items():
        assert parameter_count(Config.from_name(name)) == count, f"{name}: run scripts/catalogue_params.py"


def models(env=None):
    done = subprocess.run([sys.executable, "-m", "lucidlm", "models"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if f" {name} " in line)


def test_models_says_what_loads_now_and_how_to_get_the_rest(tmp_path):
    hub = tmp_path / "hub"
    snapshot = hub / "models--HuggingFaceTB--SmolLM2-1.7B-Instruct" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    partial = hub / "models--Qwen--Qwen3-0.6B" / "snapshots" / "4567"  # config only: not loadable
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    out = models({"HF_HUB_CACHE": str(hub)})
    assert row(out, "SmolLM2-1.7B-Instruct").split()[0] == "cached"
    assert row(out, "SmolLM2-135M-Instruct").split()[0] == "embedded"
    assert row(out, "Qwen3-0.6B").split()[0] == "-" and row(out, "gpt2").split()[0] == "-"
    assert f"{len(CATALOGUE) - 2} not downloaded: lucidlm download NAME" in out
    assert "1.71B" in row(out, "SmolLM2-1.7B-Instruct") and "tiny-llama" in out


def test_cached_snapshot_reads_the_cache_layout(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert cached_snapshot("org/none") is None
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({}))
    assert cached_snapshot("org/tiny") is None  # no weights yet
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert cached_snapshot("org/tiny") == snapshot

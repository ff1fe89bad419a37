"""lucidlm.registry: every registration table is one Registry, and a scope undoes what a test registers."""

import threading

import pytest

import lucidlm
from lucidlm.checkpoints.layouts import LAYOUTS, Layout
from lucidlm.config import Config
from lucidlm.errors import ConfigError
from lucidlm.families import COMPONENTS, FAMILIES, REGISTRY, Family
from lucidlm.hf.registry import MODELS
from lucidlm.registry import Registry, scoped


def test_every_table_is_a_registry():
    assert all(isinstance(table, Registry) for table in (FAMILIES, LAYOUTS, REGISTRY, COMPONENTS, MODELS))
    assert "LlamaForCausalLM" in FAMILIES and "llama" in LAYOUTS and "tiny-llama" in REGISTRY


def test_a_scope_undoes_registrations_and_removals_even_on_error():
    before = FAMILIES.snapshot(), LAYOUTS.snapshot()
    toy = Family("ToyForCausalLM", "toy", traits=dict(mlp="glu"))
    with pytest.raises(RuntimeError), scoped(FAMILIES, LAYOUTS):
        lucidlm.register_family(toy, Layout((("model.", ""),)))
        del FAMILIES["LlamaForCausalLM"]
        assert FAMILIES["ToyForCausalLM"] is toy and "toy" in LAYOUTS
        raise RuntimeError("the test failed halfway")
    assert (FAMILIES.snapshot(), LAYOUTS.snapshot()) == before


def test_a_scoped_config_name_is_gone_afterwards():
    with REGISTRY.scoped():
        lucidlm.register_config(dict(name="scoped-tiny", vocab_size=64, n_embd=32, n_layer=1, n_head=2))
        assert Config.from_name("scoped-tiny").n_layer == 1
    with pytest.raises(ConfigError, match="unknown config name 'scoped-tiny'"):
        Config.from_name("scoped-tiny")


def test_scopes_nest_and_restore_in_place():
    table = Registry("thing", {"a": 1})
    with table.scoped() as same:
        assert same is table
        table["b"] = 2
        with table.scoped():
            table.clear()
            assert len(table) == 0
        assert dict(table) == {"a": 1, "b": 2}
    assert dict(table) == {"a": 1} and table.pop("missing", None) is None


def test_registering_while_another_thread_walks_the_table():
    table = Registry("thing", {str(i): i for i in range(100)})
    errors = []

    def walk():
        try:
            for _ in range(200):
                sum(table.values()), list(table), dict(table.items())
        except Exception as exc:  # noqa: BLE001 - any error is the finding
            errors.append(exc)

    walkers = [threading.Thread(target=walk) for _ in range(2)]
    for thread in walkers:
        thread.start()
    for i in range(100, 2000):
        table[str(i)] = i
        del table[str(i - 100)]
    for thread in walkers:
        thread.join()
    assert errors == []


def test_config_and_the_catalogue_are_plain_data():
    """Reading every catalogue entry imports neither torch nor the model (a lower floor never reaches up)."""
    import subprocess
    import sys

    code = ("import sys; from lucidlm.catalogue import CATALOGUE; from lucidlm.config import Config\n"
            "[Config.from_name(name) for name in CATALOGUE]\n"
            "print(sorted(m for m in ('torch', 'lucidlm.model', 'lucidlm.checkpoints') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

"""Bad input on the extension path: registering, and loading checkpoints that name classes."""

import dataclasses

import pytest
import torch
from torch import nn

import lucidlm
from lucidlm import GPT, Config, rules
from lucidlm.config import COMPONENTS, REGISTRY
from lucidlm.errors import ConfigError
from lucidlm.registry import scoped


@dataclasses.dataclass
class KnobConfig(Config):
    knob: float = 2.0


class KnobMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.knob = config.knob

    def forward(self, x):
        return self.down(rules.activation(torch.tanh, self.up(x))) * self.knob


@pytest.fixture(autouse=True)
def restore_registries():
    with scoped(REGISTRY, COMPONENTS):
        yield


def knob_config(**changes):
    return KnobConfig(name="knob-tiny", vocab_size=64, n_embd=32, n_layer=1, n_head=2, intermediate_size=64,
                      block_size=64, mlp_class=KnobMLP, **changes)


def test_a_checkpoint_naming_an_unregistered_class_is_refused_not_imported(tmp_path):
    lucidlm.register_config(knob_config())
    torch.manual_seed(0)
    llm = lucidlm.LLM(GPT(Config.from_name("knob-tiny")))
    llm.save(tmp_path / "knob")
    reloaded = lucidlm.LLM.load(tmp_path / "knob")
    assert type(reloaded.config) is KnobConfig and reloaded.config.mlp_class is KnobMLP
    COMPONENTS.clear()  # a fresh process that never registered the classes
    with pytest.raises(ConfigError, match=r"names the class '.*KnobConfig', which is not registered"):
        lucidlm.LLM.load(tmp_path / "knob")


def test_register_config_rejects_what_is_not_a_config():
    with pytest.raises(ConfigError, match="expected a Config or a dict of its fields, got str"):
        lucidlm.register_config("tiny")
    with pytest.raises(ConfigError, match="needs a name"):
        lucidlm.register_config(dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="not divisible"):
        lucidlm.register_config(dict(name="bad", vocab_size=64, n_embd=30, n_layer=1, n_head=4))
    assert "bad" not in REGISTRY


def test_register_family_rejects_what_is_not_a_family():
    from lucidlm.config import register_family

    with pytest.raises(ConfigError, match="expected a Family, got dict"):
        register_family({"architecture": "X"})

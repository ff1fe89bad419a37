"""The catalogue: every entry's published config loads by name, and parameter counts equal the
published model sizes (counted by transformers and on the model cards)."""

import pytest

from lucidlm.catalogue import CATALOGUE, CONFIGS
from lucidlm.cli import main
from lucidlm.config import Config
from lucidlm.model.size import parameter_count

#: parameters as transformers counts them (num_parameters(), tied embeddings once)
PUBLISHED = {"SmolLM2-135M-Instruct": 134_515_008, "gpt2": 124_439_808, "Llama-3.2-1B": 1_235_814_400,
             "Qwen2.5-0.5B-Instruct": 494_032_768, "pythia-70m": 70_426_624,
             "gemma-2b": 2_506_172_416, "stablelm-2-1_6b": 1_644_515_328, "SmolLM3-3B": 3_075_098_624,
             "OLMo-1B-hf": 1_176_764_416, "granite-3.0-2b-instruct": 2_533_531_648,
             "c4ai-command-r-v01": 34_980_831_232, "gpt-j-6b": 6_050_882_784,
             "Qwen1.5-MoE-A2.7B": 14_315_784_192, "Qwen3-30B-A3B": 30_532_122_624, "falcon-7b": 6_921_720_704,
             "OLMoE-1B-7B-0924": 6_919_161_856, "granite-3.1-1b-a400m-instruct": 1_334_628_352,
             "Phi-3.5-MoE-instruct": 41_873_153_344,
             "Nemotron-Mini-4B-Instruct": 4_190_509_056}


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_entry_loads_by_name(name):
    assert (CONFIGS / f"{name}.json").is_file()
    c = Config.from_name(name)
    assert c.name == name and c.hf_config is not None
    assert "/" in CATALOGUE[name]


@pytest.mark.parametrize("name, count", sorted(PUBLISHED.items()))
def test_parameter_counts_match_the_published_sizes(name, count):
    assert parameter_count(Config.from_name(name)) == count


def test_models_lists_the_catalogue_with_sizes(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out and "135M" in out and "1.24B" in out


def test_unverified_configs_stay_out_of_the_catalogue():
    from lucidlm.catalogue import UNVERIFIED

    assert all((CONFIGS / f"{name}.json").is_file() and name not in CATALOGUE for name in UNVERIFIED)

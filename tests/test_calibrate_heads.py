"""Retrieval-head calibration (``lucidlm calibrate-heads``) and its file: scores against the attention
recorded by a plain forward, the file's model identity and its typed errors, the command line."""

import json

import pytest
import torch

from cli_probe import probe
from lucidlm import GPT, Config
from lucidlm.cache.heads import (HeadScores, calibrate_heads, model_identity, needle_prompts, read_head_scores,
                                 write_head_scores)
from lucidlm.errors import CacheError, DataError
from lucidlm.model.attention import recording_weights


class _Tokenizer:
    """Characters as tokens (ids 3..258 folded into a 256 vocabulary), BOS = 1."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 250 for c in text]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 4)
    return [path]


def test_needle_prompts_are_deterministic_and_place_the_needle_by_depth(texts):
    text = texts[0].read_text()
    a, b = needle_prompts(_Tokenizer(), text, 3, 200, seed=1), needle_prompts(_Tokenizer(), text, 3, 200, seed=1)
    assert a == b and a != needle_prompts(_Tokenizer(), text, 3, 200, seed=2)
    assert all(len(p.ids) == 200 for p in a)
    question = len(" What is the pass key? The pass key is")
    assert a[0].needle[0] == 1 and a[2].needle[1] == a[2].answer_queries[0] + 1 - question  # depths 0%, 100%
    with pytest.raises(DataError, match="length=50"):
        needle_prompts(_Tokenizer(), text, 1, 50)


def test_scores_are_the_needle_attention_of_the_answer_queries(model, texts):
    heads = calibrate_heads(model, _Tokenizer(), texts, samples=2, length=120, seed=0)
    assert heads.model == model_identity(model.config) and len(heads.scores) == model.config.n_layer
    want = torch.zeros(model.config.n_layer, model.config.n_query_groups)
    for prompt in needle_prompts(_Tokenizer(), texts[0].read_text(), 2, 120, seed=0):
        with torch.no_grad(), recording_weights() as weights:  # the oracle: a forward without any cache
            model(torch.tensor([prompt.ids]))
        (q0, q1), (n0, n1) = prompt.answer_queries, prompt.needle
        want += torch.stack([w[0, :, :, q0:q1, n0:n1].sum(-1).mean(dim=(1, 2)) for w in weights]) / 2
    torch.testing.assert_close(torch.tensor(heads.scores), want, atol=1e-6, rtol=1e-5)


def test_the_file_names_its_model_and_refuses_another(tmp_path, model):
    path = tmp_path / "heads.json"
    write_head_scores(path, HeadScores(model_identity(model.config), [[0.1, 0.2], [0.3, 0.4]]))
    assert read_head_scores(path, model.config).scores == [[0.1, 0.2], [0.3, 0.4]]
    other = Config.from_name("tiny-llama")
    other.n_layer = 3
    with pytest.raises(CacheError, match=r"heads\.json: head scores of model 'tiny-llama' \(2 layers.*not of this "
                                         r"model 'tiny-llama' \(3 layers"):
        read_head_scores(path, other)
    with pytest.raises(CacheError, match="missing.json: no such file"):
        read_head_scores(tmp_path / "missing.json", model.config)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CacheError, match="bad.json: not valid JSON"):
        read_head_scores(tmp_path / "bad.json", model.config)
    (tmp_path / "short.json").write_text(json.dumps({**json.loads(path.read_text()), "scores": [[0.1]]}))
    with pytest.raises(CacheError, match="short.json: malformed head-score file: expected 2 layers of 2"):
        read_head_scores(tmp_path / "short.json", model.config)
    (tmp_path / "plain.json").write_text("[1, 2]")
    with pytest.raises(CacheError, match="plain.json: not a head-score file"):
        read_head_scores(tmp_path / "plain.json", model.config)


def test_command_line_help_is_torch_free_and_bad_arguments_exit_2(tmp_path):
    result, _ = probe("calibrate-heads", "--help")
    assert result["status"] == 0 and "torch" not in result["heavy"]
    for argv, fragment in ((["--samples", "0", "--out", tmp_path / "h.json"], "--samples"),
                           (["--length", "x", "--out", tmp_path / "h.json"], "--length"),
                           ([], "--out")):
        result, err = probe("calibrate-heads", *argv)
        assert result["status"] == 2 and "torch" not in result["heavy"], argv
        assert err.count("\n") == 1 and fragment in err, err
    result, err = probe("calibrate-heads", "--out", tmp_path / "no-such-dir" / "h.json")
    assert result["status"] == 2 and "no-such-dir" in err and "torch" not in result["heavy"]

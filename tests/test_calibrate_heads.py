"""Retrieval-head calibration (``lucidlm calibrate-heads``) and its file: scores against the attention
recorded by a plain forward, the file's model identity and its typed errors, the command line."""

import json

import pytest
import torch

from cli_probe import probe
from lucidlm import GPT, Config
from lucidlm.cache.heads import HeadScores, model_identity, read_head_scores, write_head_scores
from lucidlm.calibrate import calibrate_heads, needle_prompts
from lucidlm.errors import CacheError
from lucidlm.ruler import Haystack, make_samples
from lucidlm.model.attention import recording_weights


class _Tokenizer:
    """Characters as tokens (ids 3..258 folded into a 256 vocabulary), BOS = 1."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 250 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 4)
    return [path]


def test_needle_prompts_are_the_ruler_passkey_task_with_its_answer_at_spread_depths(texts):
    text, tok = texts[0].read_text(), _Tokenizer()
    a, b = needle_prompts(tok, text, 3, 300, seed=1), needle_prompts(tok, text, 3, 300, seed=1)
    assert a == b and a != needle_prompts(tok, text, 3, 300, seed=2)
    samples = make_samples(tok, Haystack(tok, text), ["passkey"], [300], [0.0, 0.5, 1.0], seed=1)
    for prompt, sample in zip(a, samples):  # the bench's own prompt, then the answer teacher-forced
        answer = tok.encode(" " + sample.answers[0], add_special_tokens=False)
        assert prompt.ids == sample.ids + answer and len(prompt.ids) == 300 + len(answer)
        start, size = sample.spans[0]
        assert prompt.needle == (start, start + size) and prompt.answer_queries == (299, 299 + len(answer))
    assert a[0].needle[0] < a[1].needle[0] < a[2].needle[0]  # depths 0%, 50%, 100%
    with pytest.raises(CacheError, match="--length 50: a passkey prompt needs more than"):
        needle_prompts(tok, text, 1, 50)


def test_scores_are_the_needle_attention_of_the_answer_queries(model, texts):
    heads = calibrate_heads(model, _Tokenizer(), texts, samples=2, length=300, seed=0)
    assert heads.model == model_identity(model.config) and len(heads.scores) == model.config.n_layer
    want = torch.zeros(model.config.n_layer, model.config.n_query_groups)
    for prompt in needle_prompts(_Tokenizer(), texts[0].read_text(), 2, 300, seed=0):
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

"""The RULER-style task generator (lucidlm.ruler) and kvpress's results folders
(lucidlm.bench.kvpress_results): exact lengths, depth placement, each fact present once, determinism
under a seed, RULER's string-match scoring against hand examples, bad input, and the folder format
read back by independent readers (csv, PyYAML, json)."""

from __future__ import annotations

import collections
import csv
import json
import re

import pytest

from lucidlm import ruler
from lucidlm.bench import kvpress_results
from lucidlm.errors import CacheError

HAYSTACK = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
            "and associated documentation files, to deal in the Software without restriction, including "
            "without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense.\n") * 40


class Words:
    """A toy tokenizer: one token per word or run of spaces/punctuation (ids are indices into a vocabulary
    grown as it goes), so token counts differ from character counts and decoding is exact."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []  # a BOS, as the real tokenizer may add
        for piece in re.findall(r"\s*[A-Za-z0-9]+|\s*[^A-Za-z0-9\s]+|\s+", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.words) + 2
                self.words.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids):
        return "".join(self.words[i - 2] if i >= 2 else "" for i in ids)


@pytest.fixture
def tok():
    return Words()


def _make(tok, tasks=ruler.TASKS, lengths=(700, 900), depths=(0, 0.5, 1), trials=1, seed=0):
    return ruler.make_samples(tok, HAYSTACK, tasks, lengths, depths, trials, seed)


def test_every_sample_has_its_exact_length_and_a_question_at_the_end(tok):
    for s in _make(tok):
        assert len(s.ids) == s.length
        question = tok.decode(s.question)
        assert 0 < s.question_tokens < 80 and question == tok.decode(s.ids)[-len(question):]
        assert re.search(r"(What (is|are all) the|Question:)", question) and question.endswith((" is", " are", ":"))


def test_samples_are_deterministic_under_a_seed_and_differ_across_seeds(tok):
    first, again, other = _make(tok, seed=7), _make(tok, seed=7), _make(tok, seed=8)
    assert first == again
    for a, b in zip(first, other):
        assert a.task == b.task and a.ids != b.ids and a.answers != b.answers
    assert len(first) == len(ruler.TASKS) * 2 * 3


@pytest.mark.parametrize("task", ["passkey", "needle", "niah_single", "niah_multikey", "niah_multivalue"])
def test_the_asked_fact_sits_at_the_requested_depth(tok, task):
    intro = len(tok.encode(ruler._INTRO["niah" if task.startswith("niah") else task]))
    for depth in (0, 0.25, 0.5, 0.75, 1):
        s = _make(tok, [task], [800], [depth], seed=3)[0]
        hay = s.length - intro - sum(n for _, n in s.spans) - s.question_tokens
        before = s.needle_start - intro - sum(n for start, n in s.spans if start < s.needle_start)
        assert abs(before - depth * hay) <= ruler.SNAP  # haystack tokens before the asked fact
        fact = tok.decode(s.ids[s.needle_start:s.needle_start + s.needle_len])
        assert fact.startswith("\n\n") and fact.endswith(".\n\n") and s.answers[0] in fact
        if 0 < before < hay:  # the fact sits at a word boundary of the haystack
            assert tok.decode(s.ids[s.needle_start + s.needle_len:][:1])[:1].isspace()


@pytest.mark.parametrize("task", ["passkey", "needle", "niah_single", "niah_multikey", "niah_multivalue", "vt"])
def test_each_fact_is_in_the_prompt_once_and_the_answers_nowhere_else(tok, task):
    for s in _make(tok, [task], [700, 1000], [0, 0.3, 1]):
        text = tok.decode(s.ids)
        pieces = [tok.decode(s.ids[a:a + n]).strip() for a, n in s.spans]
        for piece in pieces:
            assert text.count(piece) == 1
        outside = "".join(tok.decode(s.ids[a:b]) for a, b in _gaps(s))
        for answer in s.answers:
            assert answer not in outside
            assert sum(answer in p for p in pieces) >= 1
        if task == "niah_multikey":  # four keys, one asked, their values all different
            assert len(pieces) == ruler.N_KEYS and len({p.split()[-1] for p in pieces}) == ruler.N_KEYS
        if task == "niah_multivalue":
            assert len(s.answers) == ruler.N_VALUES and all(a in text for a in s.answers)
        if task == "vt":  # the chain in order: each name bound to the previous one, the first to the value
            starts = [a for a, _ in s.spans]
            assert starts == sorted(starts) and len(s.answers) == ruler.N_HOPS + 1
            assert pieces[0].startswith(f"VAR {s.answers[0]} = ") and all(
                p == f"VAR {b} = VAR {a}." for p, a, b in zip(pieces[1:], s.answers, s.answers[1:]))


def _gaps(s):
    """(start, end) of the ids outside every piece."""
    last = 0
    for a, n in sorted(s.spans):
        yield last, a
        last = a + n
    yield last, len(s.ids)


def test_cwe_lists_ten_words_far_more_often_than_any_other(tok):
    for s in _make(tok, ["cwe"], [600, 1200], [0.5]):
        start, n = s.spans[0]
        listed = re.findall(r"(\d+)\. ([a-z]+)", tok.decode(s.ids[start:start + n]))
        assert [int(i) for i, _ in listed] == list(range(1, len(listed) + 1))  # numbered in order
        counts = collections.Counter(w for _, w in listed)
        top = counts.most_common()
        assert {w for w, _ in top[:ruler.N_COMMON]} == set(s.answers)
        assert top[ruler.N_COMMON - 1][1] > top[ruler.N_COMMON][1] >= 1 and len(s.ids) == s.length


def test_vt_chain_starts_at_depth_and_keeps_its_order(tok):
    for depth in (0, 0.5, 1):
        s = _make(tok, ["vt"], [900], [depth])[0]
        assert [a for a, _ in s.spans] == sorted(a for a, _ in s.spans)
        assert s.answers[0] in tok.decode(s.ids[s.needle_start:s.needle_start + s.needle_len])


def test_the_real_tokenizer_gives_exact_lengths_and_the_needle_once(ours):
    for s in ruler.make_samples(ours, HAYSTACK * 3, ruler.TASKS, [1024], [0, 0.5, 1], seed=2):
        assert len(s.ids) == 1024
        needle = ours.decode(s.ids[s.needle_start:s.needle_start + s.needle_len]).strip()
        assert ours.decode(s.ids).count(needle) == 1 or s.task == "cwe"
        assert ours.decode(s.question).lstrip().startswith(("What", "Question"))


def test_too_short_a_length_names_the_flag(tok):
    with pytest.raises(CacheError, match="--lengths 40"):
        _make(tok, ["needle"], [40])
    with pytest.raises(CacheError, match="--lengths 60"):
        _make(tok, ["cwe"], [60])


def test_an_unknown_task_is_a_typed_error_listing_the_valid_ones(tok):
    with pytest.raises(CacheError, match="unknown task 'qa_1'; expected some of passkey, needle, niah_single"):
        _make(tok, ["passkey", "qa_1"])


@pytest.mark.parametrize("prediction, answers, expected", [
    (" 71432.", ["71432"], 1.0), (" 714321", ["71432"], 1.0),  # RULER's rule: the answer anywhere in the output
    (" 7143", ["71432"], 0.0), ("\x00 71432\x1f", ["71432"], 1.0),
    (" Eat a sandwich in Dolores Park!", ["eat a sandwich in Dolores Park"], 1.0),
    ("1234567, 7654321 and 1111111", ["1234567", "7654321", "2222222", "1111111"], 0.75),
    ("QXJRT, BZKEO", ["qxjrt", "bzkeo", "ABCDE"], 2 / 3), ("", ["x"], 0.0), ("anything", [], 0.0),
])
def test_string_match_is_the_share_of_answers_found(prediction, answers, expected):
    assert ruler.string_match(prediction, answers) == pytest.approx(expected)


def test_task_scores_are_kvpress_metrics():
    # by hand: vt 1/2 and 1/1 -> 75%; niah_single 1 and 0 -> 50%
    got = ruler.task_scores(["A B", "A", "4830219", "no"], [["A", "C"], ["A"], ["4830219"], ["1234567"]],
                            ["vt", "vt", "niah_single", "niah_single"])
    assert got == {"niah_single": {"string_match": 50.0}, "vt": {"string_match": 75.0}}


def _records():
    return [dict(question="What is the pass key? The pass key is", answer=["71432"], task="passkey",
                 max_new_tokens=6, predicted_answer=' 71432, "yes"\n', length=1024, depth=0.0, trial=0,
                 question_tokens=12),
            dict(question="Question: ...", answer=["AB", "CD"], task="vt", max_new_tokens=9,
                 predicted_answer=" AB and", length=1024, depth=1.0, trial=0, question_tokens=40)]


def test_results_folder_round_trip_in_kvpress_format(tmp_path):
    yaml = pytest.importorskip("yaml")  # PyYAML: kvpress's own reader of config.yaml
    folder = kvpress_results.write_results(tmp_path, model="HuggingFaceTB/SmolLM2-135M-Instruct", policy="snapkv",
                                           compression_ratio=0.75, data_dir="1024", rows=_records(), seed=3,
                                           extra={"cache_tokens": "25%"})
    assert folder == tmp_path / "ruler__1024__HuggingFaceTB--SmolLM2-135M-Instruct__snapkv__0.75__query_aware"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.json", "predictions.csv"]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["dataset"] == "ruler" and config["data_dir"] == "1024" and config["compression_ratio"] == 0.75
    assert config["press_name"] == "snapkv" and config["query_aware"] is True and config["seed"] == 3
    assert config["lucidlm"]["cache_tokens"] == "25%" and config["press_init_command"] == "snapkv"
    assert json.loads((folder / "metrics.json").read_text()) == {"passkey": {"string_match": 100.0},
                                                                "vt": {"string_match": 50.0}}
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:7] == ["question", "answer_prefix", "answer", "task", "max_new_tokens", "predicted_answer",
                                 "compression_ratio"]
    assert rows[0]["answer"] == "['71432']" and rows[1]["answer"] == "['AB', 'CD']"  # as pandas writes lists
    assert rows[0]["predicted_answer"] == ' 71432, "yes"\n' and float(rows[1]["score"]) == 0.5
    back = kvpress_results.read_results(folder)
    assert back["predictions"][1]["answer"] == ["AB", "CD"] and back["predictions"][0]["depth"] == 0.0
    assert back["metrics"]["vt"] == {"string_match": 50.0} and back["config"] == config
    again = kvpress_results.write_results(tmp_path, model="HuggingFaceTB/SmolLM2-135M-Instruct", policy="snapkv",
                                          compression_ratio=0.75, data_dir="1024", rows=_records())
    assert again == folder / "1"  # a rerun goes under the first, numbered, as kvpress does


def test_a_folder_that_is_not_a_results_folder_is_a_typed_error(tmp_path):
    with pytest.raises(CacheError, match="not a results folder"):
        kvpress_results.read_results(tmp_path)

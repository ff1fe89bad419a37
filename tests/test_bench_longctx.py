"""lucidlm bench longctx: the generated prompts hide the fact where asked, the accuracy rule, one
prompt's measurement against independent references, and the bench end to end."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch.nn import functional as F

from lucidlm.bench import longctx
from lucidlm.errors import CacheError

HAYSTACK = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
            "and associated documentation files, to deal in the Software without restriction.\n") * 60


def _needle_ids(tok, sample) -> list[int]:
    # rebuilt by hand from the answer: the fact's exact wording, independent of the generator
    if sample.task == "passkey":
        key = sample.answer
        sentence = f"The pass key is {key}. Remember it. {key} is the pass key."
    else:
        city = next(c for c in longctx._CITIES if f"in {c} is {sample.answer}" in tok.decode(sample.ids))
        sentence = f"The best thing to do in {city} is {sample.answer}."
    return tok.encode(f"\n\n{sentence}\n\n", add_special_tokens=False)


def _find(ids: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]


@pytest.mark.parametrize("task", longctx.TASKS)
def test_the_fact_sits_at_the_requested_depth(ours, task):
    corpus = ours.encode(HAYSTACK, add_special_tokens=False)
    for depth in (0, 0.25, 0.5, 0.75, 1):
        s = longctx.make_samples(ours, corpus, [task], [300], [depth], seed=3)[0]
        needle = _needle_ids(ours, s)
        intro = len(ours.encode(longctx._INTRO[task]))
        ask = len(ours.encode("\n\n" + ("What is the pass key? The pass key is" if task == "passkey" else
                                        ours.decode(s.ids).rsplit("\n\n", 1)[1]), add_special_tokens=False))
        hay = 300 - intro - len(needle) - ask
        assert len(s.ids) == 300 and _find(s.ids, needle) == [s.needle_start]
        assert abs(s.needle_start - (intro + depth * hay)) <= longctx.SNAP  # at depth, within the snap
        text, fact = ours.decode(s.ids), ours.decode(needle)
        assert text.endswith("The pass key is" if task == "passkey" else " is")
        head, ask_text = len(ours.decode(s.ids[:intro])), len(ours.decode(s.ids[-ask:]))
        hay_chars = len(text) - head - len(fact) - ask_text  # the same, counted in characters
        assert abs((text.index(fact) - head) / hay_chars - depth) < 0.05


def test_samples_are_deterministic_under_a_seed(ours):
    corpus = ours.encode(HAYSTACK * 3, add_special_tokens=False)
    make = lambda seed: longctx.make_samples(ours, corpus, longctx.TASKS, [200, 260], [0, 0.5], 2, seed)
    first, again, other = make(7), make(7), make(8)
    assert first == again and first != other
    assert len(first) == 2 * 2 * 2 * 2 and len({s.answer for s in first if s.task == "passkey"}) > 1


def test_too_short_a_length_names_the_flag(ours):
    corpus = ours.encode(HAYSTACK, add_special_tokens=False)
    with pytest.raises(CacheError, match="--lengths 40"):
        longctx.make_samples(ours, corpus, ["needle"], [40], [0.5])


@pytest.mark.parametrize("generated, answer, expected", [
    (" 71432.", "71432", True), ("71432", "71432", True), (" 71432\nThe pass", "71432", True),
    (" 714321", "71432", False), (" 7143", "71432", False), (" The pass key is 71432", "71432", False),
    (" Eat a sandwich in Dolores   Park!", "eat a sandwich in Dolores Park", True),
    (" eat a sandwich in Dolores", "eat a sandwich in Dolores Park", False), ("", "", False),
])
def test_accuracy_rule(generated, answer, expected):
    assert longctx.is_correct(generated, answer) is expected


def test_one_prompt_against_generate_and_a_full_forward(tiny_lm_dir):
    import lucidlm
    from lucidlm.generate import generate_ids

    llm = lucidlm.LLM.load(tiny_lm_dir)
    corpus = llm.tokenizer.encode(HAYSTACK, add_special_tokens=False)
    sample = longctx.make_samples(llm.tokenizer, corpus, ["passkey"], [120], [0.5], seed=1)[0]
    one = longctx.run_one(llm.model, llm.tokenizer, sample, "dense", 200, chunk_size=32)
    new = len(llm.tokenizer.encode(" " + sample.answer, add_special_tokens=False)) + 2
    ref = [t[0] for t in generate_ids(llm.model, [sample.ids], max_new_tokens=new, chunk_size=32)]
    assert one["text"] == llm.tokenizer.decode(ref)
    assert one["correct"] == longctx.is_correct(llm.tokenizer.decode(ref), sample.answer)
    with torch.no_grad():  # dense: the summed NLL of one full forward pass
        logits = llm.model(torch.tensor([sample.ids]))[0, :-1]
    nll = F.cross_entropy(logits.float(), torch.tensor(sample.ids[1:]), reduction="sum").item()
    assert one["n_tokens"] == 119 and one["nll"] == pytest.approx(nll, rel=1e-4)
    evicting = longctx.run_one(llm.model, llm.tokenizer, sample, "h2o", 30, chunk_size=32)
    ref = [t[0] for t in generate_ids(llm.model, [sample.ids], max_new_tokens=new, kv_cache="h2o",
                                      cache_tokens=30, chunk_size=32)]
    assert evicting["text"] == llm.tokenizer.decode(ref)  # the same policy, the same greedy answer
    assert evicting["memory_bytes"] < one["memory_bytes"]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    longctx.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_end_to_end_prints_the_table_and_a_png(tiny_lm_dir, tmp_path, capsys):
    import matplotlib.image

    png = tmp_path / "acc.png"
    args = _args(["--model", str(tiny_lm_dir), "--lengths", "96,128", "--depths", "0,1", "--tasks", "passkey",
                  "--policies", "window,snapkv(window=4)", "--fractions", "0.5", "--chunk-size", "32",
                  "--heatmap", str(png)])
    assert longctx.run(args) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[1] == ("| policy | of prompt | accuracy | passkey | L=96 | L=128 | perplexity | vs dense | "
                        "cache MiB | decode tok/s |")
    rows = [line.split(" | ") for line in lines[3:6]]
    assert [r[0].lstrip("| ") for r in rows] == ["dense", "window", "snapkv(window=4)"]
    assert [r[1] for r in rows] == ["100%", "50%", "50%"] and rows[0][7] == "+0.0%"
    for r in rows:  # accuracy: a whole number of the 4 prompts, 2 per length
        assert r[2] in {"0%", "25%", "50%", "75%", "100%"} and all(c in {"0%", "50%", "100%"} for c in r[4:6])
    assert lines[6] == f"heatmap: {png}" and "bench longctx: 100%|" in err
    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 200


@pytest.mark.parametrize("flag, value", [("--depths", "0,1.5"), ("--lengths", "abc"), ("--tasks", "quiz"),
                                         ("--policies", "lru"), ("--trials", "0")])
def test_bad_options_fail_before_loading(flag, value, capsys):
    assert longctx.run(_args([flag, value, "--model", "/nonexistent"])) == 1
    out = capsys.readouterr().out
    assert "lucidlm bench longctx:" in out and ("lru" in out if flag == "--policies" else flag in out)

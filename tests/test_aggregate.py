"""Explanations gathered over words, character spans and documents (issue 15, part B).

Every check compares with an independent computation: hand-written word lists, hand-computed
means and maxima, the tokenizers' own character offsets (``tokenizers``' ``Encoding.offsets``),
and the conservation law (a regrouping must keep the sum of the relevances).
"""

from __future__ import annotations

import doctest
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lucidlm import LLM
from lucidlm.errors import ExplainError
from lucidlm.explain import aggregate
from lucidlm.explain.explanation import Explanation, GenerationExplanation, load_json
from lucidlm.explain.targets import token_strings

SENTENCE = "Zürich naïveté 東京 is lovely, isn't it? Yes: 2024."
# SmolLM2's byte-level BPE splits 東京 into five byte tokens (each shows as U+FFFD)
SMOL_WORDS = ["Zürich", " naïveté", " 東京", " is", " lovely", ",", " isn't", " it", "?", " Yes", ":",
              " 2024", "."]
TEXTS = ["Hello world", " hello", "  hello   world  ", "café naïve über straße", "line one\nline two\n\nend",
         "tab\tseparated", "emoji 🦙🔥 and 中文字符", "it's don't", "Zürich naïveté 東京", "e\u0301 — ok 😀!",
         "<s> literal </s>", "\ufffd literal"]


def explanation(tokens, values=None, prompt=None, **kw) -> Explanation:
    values = torch.arange(1.0, len(tokens) + 1) if values is None else torch.tensor(values)
    return Explanation(tokens=tokens, token_ids=[], relevance=values, target=" x", target_ids=[5],
                       target_logit=3.0, method="attnlrp", prompt=prompt, **kw)


def close_sum(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Conservation up to float32 rounding of the group sums."""
    scale = float(b.double().abs().sum()) + 1e-12
    return abs(float(a.double().sum()) - float(b.double().sum())) <= 1e-6 * scale


@pytest.fixture(scope="module")
def llm():
    return LLM.load()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A SentencePiece (Llama-style, byte fallback) tokenizer read from a tiny GGUF."""
    pytest.importorskip("gguf")
    from test_gguf_spm import write_spm_gguf

    folder = tmp_path_factory.mktemp("spm-aggregate")
    return LLM.load(write_spm_gguf(folder / "spm.gguf"), cache_dir=folder / "cache").tokenizer


def real(tokenizer, text: str, values=None) -> Explanation:
    ids = tokenizer.encode(text)
    e = explanation(token_strings(tokenizer, ids), values, prompt=text)
    e.token_ids = ids
    return e


# --------------------------------------------------------------------------- words


def test_words_of_hand_made_byte_level_bpe_tokens():
    tokens = ["<|im_start|>", "The", " cap", "ital", " of", " Fr", "ance", ",", " don", "'t", " ",
              "2", "0", "\n", "\n", "Z", "ü", "rich", " \ufffd", "\ufffd", "\ufffd"]
    w = explanation(tokens).words()
    assert w.tokens == ["<|im_start|>", "The", " capital", " of", " France", ",", " don't", " 20",
                        "\n", "\n", "Zürich", " \ufffd\ufffd\ufffd"]
    assert w.relevance.tolist() == [1, 2, 3 + 4, 5, 6 + 7, 8, 9 + 10, 11 + 12 + 13, 14, 15,
                                    16 + 17 + 18, 19 + 20 + 21]
    assert "".join(w.tokens) == "".join(tokens) and w.token_ids == [] and w.layers is None


def test_words_of_sentencepiece_tokens_displayed_without_their_spaces():
    # what token_strings gives for a Llama tokenizer: each lone token decodes without its "▁"
    tokens = ["<s>", "The", "cap", "ital", "of", "France", "", "\ufffd", "\ufffd", "\ufffd", "."]
    w = explanation(tokens, prompt="The capital of France 東.").words()
    assert w.tokens == ["<s>", "The", " capital", " of", " France", " 東", "."]
    assert w.relevance.tolist() == [1, 2, 3 + 4, 5, 6, 7 + 8 + 9 + 10, 11]
    assert w.text == "The capital of France 東."  # offsets index the prompt: BOS takes no character


def test_words_of_raw_sentencepiece_pieces_with_and_without_the_prompt():
    tokens = ["<s>", "\u2581The", "\u2581cap", "ital", "\u2581of"]
    with_prompt = explanation(tokens, prompt="The capital of").words()
    assert with_prompt.tokens == ["<s>", "The", " capital", " of"]  # "▁" of the first: the prefix
    assert explanation(tokens).words().tokens == ["<s>", " The", " capital", " of"]


def test_words_of_the_real_smollm2_tokenizer(llm):
    e = real(llm.tokenizer, SENTENCE)
    assert any("\ufffd" in t for t in e.tokens)  # the characters really are split across tokens
    w = e.words()
    assert w.tokens == SMOL_WORDS and "".join(w.tokens) == SENTENCE
    assert close_sum(w.relevance, e.relevance)


def test_words_of_a_real_sentencepiece_tokenizer(spm):
    e = real(spm, "café naïve über straße, emoji 🦙🔥 and 中文字符!")
    assert e.tokens[0] == "<s>" and "".join(e.tokens) != e.prompt  # spaces lost in the display
    assert e.words().tokens == ["<s>", "café", " naïve", " über", " straße", ",", " emoji", " 🦙🔥",
                                " and", " 中文字符", "!"]


@pytest.mark.parametrize("which", ["smol", "spm"])
def test_every_token_lands_on_its_characters_per_the_tokenizers_offsets(which, llm, spm):
    tokenizer = llm.tokenizer if which == "smol" else spm
    for text in TEXTS:
        e = real(tokenizer, text)
        a = aggregate.align(e.tokens, e.prompt)
        assert a.text == text
        for i, (start, end) in enumerate(tokenizer.backend.encode(text).offsets):
            s, t = a.offsets[i]
            if t > s:  # the token's first non-space character lies in the range the tokenizer gives
                first = s + len(text[s:t]) - len(text[s:t].lstrip()) if text[s:t].strip() else s
                assert start <= first < max(end, start + 1), (text, i, e.tokens[i])


def test_mean_max_absmax_by_hand():
    e = explanation(["The", " cap", "ital", "ity", " is"], [0.5, 1.0, -6.0, 2.0, 4.0])
    assert e.words("sum").relevance.tolist() == [0.5, -3.0, 4.0]
    assert e.words("mean").relevance.tolist() == [0.5, -1.0, 4.0]
    assert e.words("max").relevance.tolist() == [0.5, 2.0, 4.0]
    assert e.words("absmax").relevance.tolist() == [0.5, -6.0, 4.0]
    tie = explanation(["a", "b"], [-2.0, 2.0]).words("absmax").relevance.tolist()
    assert tie == [-2.0]  # the first of equal magnitudes, sign kept


def test_unknown_agg_lists_the_valid_ones():
    e = explanation(["a", " b"])
    for call in (lambda: e.words("median"), lambda: e.spans([(0, 1)], agg="median"),
                 lambda: explanation(["a"], segments=[{"label": "x", "start": 0, "end": 1}]).context("median")):
        with pytest.raises(ExplainError, match="agg='median': expected one of sum, mean, max, absmax"):
            call()


def test_a_word_is_evicted_only_if_all_its_tokens_were():
    e = explanation(["A", "b", " c", "d", " e"], evicted=torch.tensor([True, True, True, False, False]))
    w = e.words()
    assert w.tokens == ["Ab", " cd", " e"] and w.evicted.tolist() == [True, False, False]


PIECES = ["a", "bc", " d", " ", "\n", ",", "'s", "<s>", "\ufffd", " \ufffd", "é", "\u2581x", "", "\t", "ß."]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12),
       st.lists(st.floats(-100, 100, width=32), min_size=12, max_size=12))
def test_words_and_spans_keep_the_text_and_the_sum(tokens, values):
    e = explanation(tokens, values[: len(tokens)])
    w = e.words()
    assert "".join(w.tokens) == e.text == "".join(tokens).replace("\u2581", " ")
    assert close_sum(w.relevance, e.relevance)
    n = len(e.text)
    s = e.spans({"head": (0, n // 2), "tail": (n // 2 + 1, n)} if n > 1 else {})
    assert "".join(s.tokens) == e.text and close_sum(s.relevance, e.relevance)


# --------------------------------------------------------------------------- spans


def test_spans_assign_tokens_by_their_first_non_space_character():
    prompt = "The capital of France is"
    e = explanation(["<s>", "The", " capital", " of", " France", " is"], [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],
                    prompt=prompt)
    start = prompt.index("France")  # " France" starts one character earlier, at its space
    s = e.spans({"country": (start, start + 6), "capital": (4, 6)})  # "ca": a prefix of "capital"
    assert s.tokens == ["<s>", "The", " capital", " of", " France", " is"]
    assert s.relevance.tolist() == [9.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert s.segments == [{"label": "country", "start": 15, "end": 21}, {"label": "capital", "start": 4, "end": 6}]
    assert s.context() == {"country": 4.0, "capital": 2.0, "other": 9.0 + 1.0 + 3.0 + 5.0}
    merged = e.spans([(0, 14)])  # BOS stays apart from the text: it is a segment by itself
    assert merged.tokens == ["<s>", "The capital of", " France is"]
    assert merged.relevance.tolist() == [9.0, 6.0, 9.0] and merged.context()["span 0"] == 6.0


def test_spans_conserve_the_sum_on_the_real_tokenizer(llm):
    e = real(llm.tokenizer, SENTENCE, torch.randn(len(llm.tokenizer.encode(SENTENCE))).tolist())
    tokyo = SENTENCE.index("東京")
    s = e.spans({"city": (tokyo, tokyo + 2), "first": (0, 6)})
    assert "".join(s.tokens) == SENTENCE and close_sum(s.relevance, e.relevance)
    assert s.tokens[:3] == ["Zürich", " naïveté", " 東京"]  # the five byte tokens of 東京 together
    city = [i for i, t in enumerate(e.tokens) if i >= 7 and "\ufffd" in t]
    assert s.context()["city"] == pytest.approx(e.relevance[city].double().sum().item(), abs=1e-6)


@pytest.mark.parametrize("spans, message", [
    ([(0, 5), (4, 8)], r"spans 'span 0' \(0, 5\) and 'span 1' \(4, 8\) overlap"),
    ({"a": (3, 40)}, r"span 'a' \(3, 40\): expected 0 <= start <= end <= 24"),
    ({"a": (5, 2)}, r"span 'a' \(5, 2\)"),
    ({"a": (-1, 2)}, r"span 'a' \(-1, 2\)"),
    ({"a": (0, 2.5)}, r"span 'a' = \(0, 2.5\): expected a pair of ints"),
    ([(0, 1, 2)], r"span 'span 0' = \(0, 1, 2\): expected a pair of ints"),
    ({"other": (0, 2)}, r"span label 'other' is reserved"),
])
def test_bad_spans_are_named(spans, message):
    e = explanation(["The", " capital", " of", " France", " is"], prompt="The capital of France is")
    with pytest.raises(ExplainError, match=message):
        e.spans(spans)


# --------------------------------------------------------------------------- segments and JSON


def test_segments_round_trip_through_json_and_old_json_still_loads():
    e = explanation(["<s>", "A", " b", " Q"], prompt="A b Q",
                    segments=[{"label": "Document 1", "start": 0, "end": 3}, {"label": "question", "start": 4, "end": 5}])
    back = load_json(e.to_json())
    assert back == e and back.segments == e.segments and back.context() == {
        "Document 1": 2.0 + 3.0, "question": 4.0, "other": 1.0}
    old = e.to_dict()
    del old["segments"]
    assert Explanation.from_json(json.dumps(old)).segments is None
    with pytest.raises(ExplainError, match=r"segments\[0\].*expected a dict with a label"):
        explanation(["a"], segments=[(0, 1)])
    with pytest.raises(ExplainError, match="no segments"):
        explanation(["a"]).context()


def test_words_of_a_generation_row_keep_prompt_offsets():
    g = GenerationExplanation(["<s>", "Hi", "there"], [" you", "!"], torch.ones(2, 5), "attnlrp",
                              prompt="Hi there")
    row = g.row(1)  # prompt tokens and the first generated one, which the prompt does not hold
    assert row.text == "Hi there you" and row.words().tokens == ["<s>", "Hi", " there", " you"]


# --------------------------------------------------------------------------- context (RAG)

DOCS = ["Bananas are yellow fruits rich in potassium.",
        "The Eiffel Tower is a landmark in Paris, the capital of France.",
        "Mount Everest is the highest mountain on Earth."]
QUESTION = "Question: In which city is the Eiffel Tower? Answer: The Eiffel Tower is in the city of"


def test_context_attribution_on_the_real_model(llm):
    e = llm.explain(QUESTION, context=DOCS)
    text = "".join(f"Document {n}: {d}\n\n" for n, d in enumerate(DOCS, 1)) + QUESTION
    assert e.prompt == text and e.target == " Paris"
    encoding = llm.tokenizer.backend.encode(text)
    assert e.token_ids == encoding.ids
    # independent: each token's first non-space character, from the tokenizer's own offsets
    anchors = []
    for start, end in encoding.offsets:
        piece = text[start:end]
        anchors.append(None if end == start else start + len(piece) - len(piece.lstrip()) if piece.strip() else start)
    expected, where = {}, 0
    for n, d in enumerate(DOCS, 1):
        where = text.index(d, where)
        expected[f"Document {n}"] = (where, where + len(d))
    expected["question"] = (len(text) - len(QUESTION), len(text))
    got = e.context()
    inside = set()
    for label, (start, end) in expected.items():
        members = [i for i, a in enumerate(anchors) if a is not None and start <= a < end]
        inside.update(members)
        assert got[label] == pytest.approx(e.relevance[members].double().sum().item(), abs=1e-6), label
    rest = [i for i in range(len(anchors)) if i not in inside]
    assert got["other"] == pytest.approx(e.relevance[rest].double().sum().item(), abs=1e-6)
    assert sum(got.values()) == pytest.approx(e.relevance.double().sum().item(), abs=1e-5)
    # the document that holds the answer matters most (measured: 1.23 against 0.19 and -0.02)
    assert got["Document 2"] > max(got["Document 1"], got["Document 3"]) + 0.5
    assert load_json(e.to_json()).context() == got
    words = e.words()
    assert words.context() == pytest.approx(got, abs=1e-5)  # words keep the segments and offsets


def test_context_argument_errors(llm):
    with pytest.raises(ExplainError, match="context: expected a list of document strings"):
        llm.explain("Where?", context="one document")
    with pytest.raises(ExplainError, match="needs a text prompt"):
        llm.explain([1, 2, 3], context=["doc"])


# --------------------------------------------------------------------------- renderers


def test_renderers_draw_words(llm, tmp_path):
    w = real(llm.tokenizer, SENTENCE).words()
    plain = w.to_terminal(color=False, width=200)
    assert "Zürich[" in plain and " 東京[" in plain and "\ufffd" not in plain
    assert "東京" in w.to_html() and "naïveté" in w.to_html()
    assert w.to_png()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Explanation.from_json(w.to_json()) == w


def test_doctests():
    from lucidlm.explain import explanation as module

    for m in (aggregate, module):
        assert doctest.testmod(m).failed == 0

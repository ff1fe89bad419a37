"""The one wire format of explanations (lucidlm.explain.wire): what to_dict writes, that files of
the previous version (tests/data/wire_v1, written by lucidlm before the format was shared) still
read back, and that files, /v1/explain, explain-dataset rows and both HTML pages carry the same
dict, embedded by one escaping rule and drawn by one JavaScript renderer."""

from __future__ import annotations

import doctest
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lucidlm.errors import ExplainError
from lucidlm.explain import dataset, shards, wire
from lucidlm.explain.explanation import Explanation, GenerationExplanation, ImageExplanation, load_dict, load_json
from lucidlm.render import html as render_html

V1 = Path(__file__).parent / "data" / "wire_v1"


def v1_explanation() -> Explanation:
    """The Explanation saved in tests/data/wire_v1/explanation.json (and, as a row, row.jsonl)."""
    return Explanation(
        tokens=["<s>", "The", " </script>", "\n", " NaN", " Paris"], token_ids=[1, 2, 3, 4, 5, 6],
        relevance=torch.tensor([9.0, 0.5, -1.0, math.nan, math.inf, -0.25]), target=" France",
        target_ids=[99], target_logit=math.nan, method="attnlrp",
        evicted=torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.bool),
        layers={"layers.0.attn": torch.tensor([0.5, -0.5]), "layers.0.mlp": torch.tensor(1.25)},
        prompt="The </script>\n NaN Paris", score_label="log-prob", segments=[{"label": "doc", "start": 0, "end": 4}])


def v1_generation_and_image() -> tuple[GenerationExplanation, ImageExplanation]:
    torch.manual_seed(0)
    matrix = torch.randn(2, 4)
    matrix[0, 3] = math.nan
    g = GenerationExplanation(["<s>", "Hi"], [" there", "!"], matrix, "cp-lrp", prompt_ids=[1, 2],
                              generated_ids=[3, 4], target_logits=[1.5, -math.inf],
                              evicted=torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool), prompt="Hi")
    i = ImageExplanation(torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.rand(3, 2, 2), "cat", 3.5, "attnlrp")
    return g, i


# ----------------------------------------------------------------------------- what is written


def test_to_dict_is_plain_versioned_json():
    e = v1_explanation()
    data = e.to_dict()
    assert list(data)[:3] == ["format", "version", "type"]
    assert (data["format"], data["version"], data["type"]) == ("lucidlm.explanation", wire.VERSION, "Explanation")
    assert data["relevance"] == [9.0, 0.5, -1.0, "NaN", "Infinity", -0.25]  # plain numbers, spelled non-finite
    assert data["target_logit"] == "NaN" and data["evicted"] == [False, False, False, True, False, False]
    assert data["layers"] == {"layers.0.attn": [0.5, -0.5], "layers.0.mlp": 1.25}
    assert data["tokens"][4] == " NaN"  # a token is text, never read as a number
    text = e.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = Explanation.from_json(text)
    assert back == e and back.tokens[4] == " NaN" and math.isinf(float(back.relevance[4]))
    assert back.relevance.dtype == torch.float32 and back.evicted.dtype == torch.bool


def test_every_type_round_trips_including_empty_ones():
    g, i = v1_generation_and_image()
    for e in (g, i, GenerationExplanation(["<s>", "a"], [], torch.zeros(0, 2), "attnlrp"),
              Explanation([], [], torch.zeros(0), "x", [], 0.0, "attnlrp")):
        assert load_json(e.to_json()) == e and load_dict(e.to_dict()) == e
    empty = load_json(GenerationExplanation(["a"], [], torch.zeros(0, 1), "attnlrp").to_json())
    assert empty.matrix.shape == (0, 1)  # JSON's [] has lost the shape; the fields give it back


# ----------------------------------------------------------------------------- older versions


@pytest.mark.parametrize("name", ["explanation", "generation", "image"])
def test_files_of_version_1_still_load(name):
    g, i = v1_generation_and_image()
    want = {"explanation": v1_explanation(), "generation": g, "image": i}[name]
    text = (V1 / f"{name}.json").read_text(encoding="utf-8")
    assert json.loads(text)["version"] == 1 and "__tensor__" in text
    assert load_json(text) == want and type(want).from_json(text) == want
    unversioned = json.loads(text)
    del unversioned["version"]  # what lucidlm wrote before JSON carried a version
    assert load_dict(unversioned) == want


def test_a_dataset_row_of_version_1_reads_as_an_explanation():
    row = json.loads((V1 / "row.jsonl").read_text(encoding="utf-8"))
    assert "logit" in row and "type" not in row
    e = Explanation.from_dict(row)  # the row's id is ignored
    assert e == replace(v1_explanation(), layers=None, prompt=None, segments=None)  # what rows held
    assert load_dict(row) == e


@pytest.mark.parametrize(("change", "message"), [
    ({"version": wire.VERSION + 1}, "newer than"),
    ({"format": "someone.else"}, "expected 'lucidlm.explanation'"),
    ({"type": "Nope"}, "expected one of"),
    ({"relevance": ["NaN", "lots"]}, "expected a number"),
])
def test_what_cannot_be_read_is_named(change, message):
    with pytest.raises(ExplainError, match=message):
        load_dict(v1_explanation().to_dict() | change)
    with pytest.raises(ExplainError, match="a dict"):
        Explanation.from_dict(["not", "a", "dict"])


# ----------------------------------------------------------------------------- one form everywhere


def test_server_rows_and_pages_carry_the_same_dict():
    from lucidlm.serve.app import explanation_json
    from lucidlm.serve.viewer import viewer_page

    e = v1_explanation()
    answer = explanation_json(e, "tiny")
    assert answer == {"object": "explanation", "model": "tiny", **e.to_dict()}
    assert Explanation.from_dict(answer) == e
    row = dataset._row(dataset.Item(0, "rec", "x", [1]), e)
    assert row == {"id": "rec", **e.to_dict()} and tuple(row) == dataset.ROW_FIELDS
    assert Explanation.from_dict(json.loads(shards.json_line(row))) == e

    embedded = viewer_page(e).split('id="lucidlm-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded) == e.to_dict() and embedded == render_html.script_json(e.to_dict())
    g, _ = v1_generation_and_image()
    page = g.to_html()
    data = page.split('class="lucidlm-data">', 1)[1].split("</script>", 1)[0]
    assert data == render_html.script_json(g.to_dict())
    assert viewer_page(g.to_dict()).count(render_html.script_json(g.to_dict())) == 1


def test_one_escaping_and_one_renderer():
    text = render_html.script_json({"t": "</script><!--<b>", "u": "\u2028"})
    assert "<" not in text and json.loads(text) == {"t": "</script><!--<b>", "u": "\u2028"}
    from lucidlm.serve.viewer import viewer_page

    g, _ = v1_generation_and_image()
    js = render_html.heatmap_js()
    assert "lucidlmHeatmap" in js and js in viewer_page() and js in g.to_html()
    for page in (viewer_page(g), g.to_html()):
        assert page.count("<script") == page.count("</script>")  # no data or token ends an element early


def test_doctests():
    assert doctest.testmod(wire).failed == 0

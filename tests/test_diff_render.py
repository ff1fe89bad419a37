"""Renderings and the wire form of an ExplanationDiff: terminal, HTML, PNG and JSON show the base,
tuned, difference (and adapter) rows on ONE colour scale, labelled; every reader of the wire format
(load_json, the viewer page, ``lucidlm view``) takes a diff."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from lucidlm.errors import ExplainError
from lucidlm.explain import wire
from lucidlm.explain.diff import ExplanationDiff, explain_diff
from lucidlm.explain.diff_result import ROW_KEYS
from lucidlm.explain.explanation import Explanation, load_dict, load_json
from lucidlm.render.cells import rgb, stacked_cells
from lucidlm.serve.viewer import viewer_page

from diff_util import tiny_pair

TOKENS = ["<s>", "The", " answer", " <b>is</b>", "\n"]
ANSI = re.compile(r"\x1b\[")


def explanation(relevance, score: float, **fields) -> Explanation:
    return Explanation(TOKENS, [1, 2, 3, 4, 5], torch.tensor(relevance), " 42", [42], score, "cp-lrp", **fields)


def make(adapter: bool = True) -> ExplanationDiff:
    base = explanation([5.0, 0.5, 1.0, -0.5, 0.25], 12.25)
    tuned = explanation([4.0, 2.0, 1.0, 0.5, -1.0], 15.0)
    return ExplanationDiff(base, tuned, torch.tensor([0.5, 1.5, 0.0, 0.75, -0.5]) if adapter else None)


@pytest.fixture(scope="module")
def real():
    """A diff that explain_diff made: a tiny Llama against itself with an opened LoRA adapter."""
    tuned, base = tiny_pair()
    return explain_diff(tuned, None, base, None, [1, 5, 7, 9, 11], target=3)


# ----------------------------------------------------------------------------- the rows


def test_rows_are_labelled_and_in_order():
    d = make()
    rows = d.rows()
    assert [key for key, _, _ in rows] == list(ROW_KEYS)
    assert [label for _, label, _ in rows] == ["base (logit 12.25)", "tuned (logit 15)", "tuned \u2212 base (+2.75)",
                                               "through the adapter"]
    torch.testing.assert_close(rows[2][2], d.tuned.relevance - d.base.relevance)
    assert [key for key, _, _ in make(adapter=False).rows()] == ["base", "tuned", "difference"]
    assert d.title() == ("what tuning changed · target ' 42' · logit 12.25 \u2192 15 (+2.75) · method cp-lrp")


def test_one_colour_scale_for_every_row():
    d = make()
    rows, scale = d.cells()
    # the largest |value| of any row, token 0 (the sink) of each left out: tuned's " answer" (2.0)
    assert scale == 2.0
    for row, (_, _, values) in zip(rows, d.rows()):
        assert [c.color for c in row.cells[1:]] == [rgb(float(v), 2.0) for v in values[1:]]
    # the same value looks the same in every row: 1.0 in base and tuned, 1.5 nowhere else
    assert rows[0].cells[2].color == rows[1].cells[2].color
    assert rows[2].cells[1].color != rows[0].cells[1].color
    _, unscaled = d.cells(skip_first=False)
    assert unscaled == 5.0


def test_stacked_cells_scale_is_not_a_per_row_one():
    rows, scale = stacked_cells(["a", "b"], [("x", "x", torch.tensor([1.0, 4.0])), ("y", "y", torch.tensor([0.0, 0.0]))],
                                skip_first=False)
    assert scale == 4.0 and rows[0].cells[0].color == rgb(1.0, 4.0) != rgb(1.0, 1.0)


# ----------------------------------------------------------------------------- terminal


def test_terminal_plain_text():
    text = make().to_terminal(color=False, width=200)
    lines = text.splitlines()
    assert lines[0].startswith("what tuning changed")
    labels = [line for line in lines if line.endswith(":")]
    assert labels == ["base (logit 12.25):", "tuned (logit 15):", "tuned \u2212 base (+2.75):", "through the adapter:"]
    assert "The[+1.5]" in lines[lines.index("tuned \u2212 base (+2.75):") + 1]
    assert lines[-1].startswith("colour scale ±2 ")
    assert text.count("attention sink") == 1  # one note for the token 0 of every row
    assert not ANSI.search(text)


def test_terminal_colours_only_on_a_terminal(monkeypatch):
    d = make()
    assert ANSI.search(d.to_terminal(color=True))
    assert not ANSI.search(d.to_terminal())  # pytest captures stdout: no terminal, plain text
    assert not ANSI.search(str(d))
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert ANSI.search(d.to_terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not ANSI.search(d.to_terminal())


# ----------------------------------------------------------------------------- HTML


def test_html_rows_labels_and_escaping(tmp_path):
    d = make()
    page = d.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert re.findall(r'data-row="([a-z]+)"', page) == list(ROW_KEYS)
    for _, label, _ in d.rows():
        assert f'<div class="lucidlm-label">{label}</div>' in page
    assert " &lt;b&gt;is&lt;/b&gt;" in page and "<b>is</b>" not in page
    assert page.count('class="lucidlm-bar"') == 1  # one scale, one colour bar
    assert "what tuning changed" in page
    path = d.save_html(tmp_path / "d.html")
    assert path.read_text(encoding="utf-8") == page
    fragment = d._repr_html_()
    assert not fragment.startswith("<!DOCTYPE") and 'data-row="adapter"' in fragment
    assert 'data-row="adapter"' not in make(adapter=False).to_html()


# ----------------------------------------------------------------------------- PNG


def test_png_figure_and_file(tmp_path, real):
    d = make()
    fig = d.png_figure()
    texts = [t.get_text() for t in fig.texts]
    assert texts[0].startswith("what tuning changed")
    assert texts[2:] == [label for _, label, _ in d.rows()]
    assert len(fig.axes) == len(d.rows()) + 1  # a token block per row and one colour bar
    assert fig.axes[-1].get_xlim() == pytest.approx((-2.0, 2.0))
    taller = make(adapter=False).png_figure()
    assert fig.get_figheight() > taller.get_figheight()
    path = real.save_png(tmp_path / "d.png")
    from PIL import Image

    image = np.asarray(Image.open(path))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert (image[..., 0] > 200).any() and (image[..., 2] > 200).any()


# ----------------------------------------------------------------------------- JSON and its readers


def test_json_round_trip_and_load_json(tmp_path, real):
    for d in (make(), make(adapter=False), real):
        text = d.to_json()
        assert json.loads(text)["type"] == "ExplanationDiff"
        assert ExplanationDiff.from_json(text) == d
        assert load_json(text) == d and isinstance(load_json(text), ExplanationDiff)
        assert load_dict(d.to_dict()) == d
    back = load_json(real.save_json(tmp_path / "d.json").read_text(encoding="utf-8"))
    torch.testing.assert_close(back.adapter_relevance, real.adapter_relevance)
    assert back.components("heads", top=3) == real.components("heads", top=3)
    with pytest.raises(ExplainError, match="ablate needs the tuned model"):
        back.ablate(["layers.0"])


def test_non_finite_values_survive():
    d = ExplanationDiff(explanation([1.0, float("nan"), 0.0, 0.0, 0.0], float("-inf")),
                        explanation([1.0, 2.0, 0.0, 0.0, 0.0], 1.0))
    text = d.to_json()
    assert "NaN" in text and "Infinity" in text
    assert load_json(text) == d


def test_bad_diffs_are_named():
    data = make().to_dict()
    with pytest.raises(ExplainError, match="missing field 'tuned'"):
        ExplanationDiff.from_dict({k: v for k, v in data.items() if k != "tuned"})
    with pytest.raises(ExplainError, match=r"adapter_relevance: expected shape \(5,\)"):
        ExplanationDiff.from_dict(data | {"adapter_relevance": [1.0, 2.0]})
    with pytest.raises(ExplainError, match="base has 2 tokens and tuned 5"):
        ExplanationDiff(Explanation(["a", "b"], [], [1.0, 2.0], "x", [], 1.0, "cp-lrp"), make().tuned)
    with pytest.raises(ExplainError, match="'type' 'Nope': expected one of Explanation, .*ExplanationDiff"):
        load_dict(data | {"type": "Nope"})
    with pytest.raises(ExplainError, match="not JSON"):
        load_json("{")
    assert set(wire.TYPES) == {"Explanation", "GenerationExplanation", "ImageExplanation", "ExplanationDiff"}
    for name in wire.TYPES:
        assert wire.result_type(name).__name__ == name


def test_viewer_page_embeds_a_diff(real):
    page = viewer_page(real)
    embedded = re.search(r'<script type="application/json" id="lucidlm-data">(.*?)</script>', page, re.S)
    assert json.loads(embedded.group(1)) == real.to_dict()
    assert viewer_page(real.to_dict()) == page


def test_view_command_writes_a_diff_page(tmp_path, real):
    from lucidlm.commands.serve import VIEW

    saved = real.save_json(tmp_path / "diff.json")
    args = VIEW.parse([str(saved), "--no-open"])
    assert VIEW.run(args) == 0
    page = (tmp_path / "diff.html").read_text(encoding="utf-8")
    assert '"type": "ExplanationDiff"' in page.replace('\\u003c', '<')

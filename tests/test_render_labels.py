"""Every rendering labels the explained score with what it is (issue 13), and renders honestly.

* ``Explanation.score_label`` ("logit", "logit difference", "log-prob", "logit sum") names the
  value in the terminal, HTML, PNG and JSON renderings and in the viewer; a continuation is never
  called a "logit";
* ``to_terminal()`` colours only on a terminal without NO_COLOR;
* the PNG is 150 dpi, its colour bar is ticked at ±scale and 0, it carries the one-line legend and
  is only as wide as the prompt needs.
"""

from __future__ import annotations

import html
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lucidlm import GPT, Config
from lucidlm.render import png as hm
from lucidlm.explain.explainer import explain
from lucidlm.explain.explanation import (
    Explanation,
    GenerationExplanation,
    ImageExplanation,
    load_json,
)

LABELS = ["logit", "logit difference", "log-prob", "logit sum"]
LEGEND = "red supports the target, blue opposes it"
ESC = "\x1b["


def make(label: str = "logit", n: int = 5, **kw) -> Explanation:
    tokens = ["<s>"] + [f" w{i}" for i in range(n - 1)]
    values = torch.linspace(-1.0, 1.0, n)
    values[0] = 5.0
    fields = {"tokens": tokens, "token_ids": list(range(n)), "relevance": values,
              "target": " Paris is", "target_ids": [7, 8], "target_logit": -3.25,
              "method": "attnlrp", "score_label": label}
    return Explanation(**(fields | kw))


def make_generation() -> GenerationExplanation:
    matrix = torch.tensor([[2.0, 1.0, -0.5, 0.0], [2.0, 0.5, -1.0, 0.25]])
    return GenerationExplanation(["<s>", "Hi"], [" there", "!"], matrix, "attnlrp",
                                 target_logits=[1.5, 2.5])


def figure_texts(fig) -> list[str]:
    """Every text of a figure: figure texts, titles, tick labels and axis labels of its axes."""
    texts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        texts += [t.get_text() for t in ax.texts]
    return [t for t in texts if t]


@pytest.fixture(autouse=True)
def no_color_unset(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("label", LABELS)
def test_every_rendering_names_the_score(label):
    e = make(label)
    shown = f"({label} -3.25)"
    assert e.title() == f"target ' Paris is' {shown} · method attnlrp"
    for color in (False, True):
        assert shown in e.to_terminal(color=color, width=80).splitlines()[0]
    page = e.to_html()
    assert html.escape(shown) in page and html.escape(LEGEND) in page
    assert json.loads(e.to_json())["score_label"] == label
    assert Explanation.from_json(e.to_json()).score_label == label
    assert load_json(e.to_json()) == e
    fig = e.png_figure()
    assert shown in fig.texts[0].get_text()
    if label in ("log-prob",):  # a continuation's log-probability is no logit, anywhere
        assert "logit" not in e.to_terminal(color=False) and "logit" not in e.to_terminal(color=True)
        assert "logit" not in page
        assert not [t for t in figure_texts(fig) if "logit" in t]


def test_real_continuation_is_a_log_prob(tiny_model):
    e = explain(tiny_model, None, [1, 5, 7, 9], target=[3, 4])
    assert e.score_label == "log-prob" and e.target_logit < 0  # a sum of log-probabilities
    assert f"(log-prob {e.target_logit:.4g})" in e.title()
    for text in (e.to_terminal(color=False), e.to_terminal(color=True), e.to_html(),
                 *figure_texts(e.png_figure())):
        assert "logit" not in text
    assert "log-prob" in e.to_terminal(color=False) and "log-prob" in e.to_html()
    back = Explanation.from_json(e.to_json())
    assert back == e and back.score_label == "log-prob"


@pytest.mark.parametrize(("target", "objective", "label"), [
    ([3, 4], "logit", "logit sum"), ((3, 4), "logprob", "logit difference"), (3, "logprob", "logit")])
def test_real_labels_of_other_targets(tiny_model, target, objective, label):
    e = explain(tiny_model, None, [1, 5, 7, 9], target=target, objective=objective)
    assert e.score_label == label and f"({label} " in e.to_terminal(color=False)


def test_old_json_without_score_label_reads_as_logit():
    data = make("log-prob").to_dict()
    del data["score_label"]
    old = Explanation.from_dict(data)
    assert old.score_label == "logit" and "(logit -3.25)" in old.title()
    assert load_json(json.dumps(data)).score_label == "logit"
    data["score_label"] = None  # a writer that had the field but no value
    assert Explanation.from_dict(data).score_label == "logit"


def test_generation_rows_are_logits():
    g = make_generation()
    assert [r.score_label for r in g.rows()] == ["logit", "logit"]
    assert "(logit 2.5)" in g.row(1).title()


# ----------------------------------------------------------------------------- colour


def test_to_terminal_plain_when_stdout_is_not_a_terminal(capsys):
    e, g = make(), make_generation()
    print(e.to_terminal())
    print(g.to_terminal())
    print(e, g)
    out = capsys.readouterr().out
    assert ESC not in out and "(logit -3.25)" in out
    assert e.to_terminal() == e.to_terminal(color=False)
    assert ESC in e.to_terminal(color=True) and ESC in g.to_terminal(color=True)  # still forcible


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_to_terminal_colours_a_terminal_unless_no_color(monkeypatch):
    e, g = make(), make_generation()
    monkeypatch.setattr(sys, "stdout", _Tty())
    assert ESC in e.to_terminal() and ESC in g.to_terminal() and ESC in str(e)
    assert ESC not in e.to_terminal(color=False)
    monkeypatch.setenv("NO_COLOR", "1")
    assert ESC not in e.to_terminal() and ESC not in g.to_terminal() and ESC not in str(e)
    assert ESC in e.to_terminal(color=True)  # explicit wins
    monkeypatch.setenv("NO_COLOR", "")  # no-color.org: an empty value does not count
    assert ESC in e.to_terminal()


def test_to_terminal_without_a_usable_stdout(monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)  # pythonw, some embedders
    assert ESC not in make().to_terminal()
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    assert ESC not in make().to_terminal()


def test_terminal_and_html_legend_is_one_line():
    e = make()
    assert e.to_terminal(color=False).splitlines()[-1] == f"colour scale ±1 · relevance: {LEGEND}"
    assert e.to_terminal(color=True).splitlines()[-1].endswith(f"+1  relevance: {LEGEND}")
    legend = e.to_html().split('class="lucidlm-legend"')[1]
    assert f"<span>relevance: {html.escape(LEGEND)}</span></div>" in legend


# ----------------------------------------------------------------------------- PNG


def png_info(png: bytes) -> tuple[tuple[int, int], tuple[float, float]]:
    with Image.open(io.BytesIO(png)) as img:
        return img.size, img.info["dpi"]


def test_png_dpi_and_pixels():
    e = make(n=12)
    size, dpi = png_info(e.to_png())
    assert min(dpi) >= 150 and hm.DPI >= 150  # the pHYs chunk
    fig = e.png_figure()
    assert fig.dpi >= 150
    # ...and the pixels back it: the PNG is the figure's drawn extent (plus padding) at that dpi
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    want = ((box.width + 0.3) * hm.DPI, (box.height + 0.3) * hm.DPI)
    assert abs(size[0] - want[0]) <= 3 and abs(size[1] - want[1]) <= 3
    for png in (make_generation().to_png(),
                ImageExplanation(torch.randn(8, 8), None, "cat", 1.0, "attnlrp").to_png()):
        assert min(png_info(png)[1]) >= 150


def test_png_width_fits_the_prompt():
    short, long = make(n=5), make(n=60)
    w_short, w_long = png_info(short.to_png())[0][0], png_info(long.to_png())[0][0]
    assert w_short < w_long
    full_width = 80 * hm.CHAR_W * hm.DPI  # what every PNG used to be, whatever the prompt
    assert w_short < 0.7 * full_width
    assert w_long >= 0.9 * full_width  # a long prompt still wraps at 80 columns
    assert short.png_figure().get_figwidth() < long.png_figure().get_figwidth()
    # the title and legend set the least width: never cut off
    fig = short.png_figure()
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.width
    assert all(0 <= t.get_window_extent(renderer).x0 and t.get_window_extent(renderer).x1 <= width
               for t in fig.texts)


def test_png_figure_colour_bar_and_legend():
    e = make("log-prob", n=5)  # scale: max |relevance| without token 0 = 1
    fig = e.png_figure()
    title, legend = (t.get_text() for t in fig.texts)
    assert "(log-prob -3.25)" in title and "attention sink" in title
    assert legend == f"relevance: {LEGEND}"
    bar = fig.axes[-1]
    assert [t.get_text() for t in bar.get_xticklabels()] == ["\u22121", "0", "+1"]
    assert list(bar.get_xticks()) == [-1.0, 0.0, 1.0]
    scaled = make(relevance=torch.tensor([9.0, 0.5, -2.5, 1.0, 0.0])).png_figure().axes[-1]
    assert [t.get_text() for t in scaled.get_xticklabels()] == ["\u22122.5", "0", "+2.5"]


def test_generation_png_figure():
    fig = make_generation().png_figure()
    texts = figure_texts(fig)
    assert "2 generated token(s)" in fig.texts[0].get_text()
    assert any("red supports" in t and "blue opposes it" in t for t in texts)
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["\u2212row max", "0", "+row max"]
    assert {"<s>", "Hi", " there", "!"} <= set(texts)  # token labels on the axes


def test_image_png_figure():
    fig = ImageExplanation(torch.tensor([[1.0, -2.0], [0.5, 0.0]]), None, "cat", 1.0,
                           "attnlrp").png_figure()
    bar = fig.axes[-1]
    assert [t.get_text() for t in bar.get_xticklabels()] == ["\u22122", "0", "+2"]
    assert LEGEND in bar.get_xlabel()


# ----------------------------------------------------------------------------- viewer


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"no chromium at {chromium}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium))
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def score_head(page) -> str:
    return " ".join(page.text_content("#head-score >> xpath=..").split())


def open_file(page, tmp_path, data: dict) -> None:
    from lucidlm.serve.viewer import viewer_page

    path = tmp_path / "page.html"
    path.write_text(viewer_page(data), encoding="utf-8")
    page.goto(path.as_uri())


@pytest.mark.parametrize("label", ["log-prob", "logit difference", None])
def test_viewer_file_mode_shows_the_label(page, tmp_path, label):
    data = make(label or "logit").to_dict()
    if label is None:
        del data["score_label"]  # a file saved before the field existed
    open_file(page, tmp_path, data)
    assert score_head(page) == f"{label or 'logit'} -3.25"
    assert page.text_content("#head-score") == "-3.25"


def test_viewer_generation_rows_show_logit(page, tmp_path):
    open_file(page, tmp_path, make_generation().to_dict())
    assert score_head(page) == "logit 2.5"


def test_viewer_server_mode_shows_the_label(page, tiny_lm_dir):
    from serve_util import running_server

    from lucidlm import LLM

    with running_server(LLM.load(tiny_lm_dir)) as url:
        page.goto(f"{url}/")
        page.fill("#prompt", "The capital of France is")
        page.fill("#max-tokens", "3")
        page.fill("#temperature", "0")
        page.click("#generate")
        page.wait_for_function(
            "document.body.dataset.phase === 'idle' && document.querySelector('.tok.gen')")
        index = page.eval_on_selector(".tok.gen", "e => Number(e.dataset.index)")
        page.click(f'.tok[data-index="{index}"]')
        page.wait_for_selector(f'#tokens[data-explained="{index}:attnlrp"]')
        assert score_head(page).startswith("logit ")
        page.fill("#contrast", "5")  # a token id: why this token rather than token 5
        page.click(f'.tok[data-index="{index}"]')
        page.wait_for_function("document.getElementById('head-score').dataset.label === 'logit difference'")
        assert score_head(page).startswith("logit difference ")

"""Renderings and serialisation of explanations (lucidlm.explain.explanation, lucidlm.render)."""

from __future__ import annotations

import doctest
import html
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lucidlm import fileio
from lucidlm.errors import ExplainError
from lucidlm.explain import explanation as ex
from lucidlm.render import cells as hm
from lucidlm.render import html as render_html
from lucidlm.render import png as render_png
from lucidlm.render import terminal as render_terminal
from lucidlm.explain.explanation import Explanation, GenerationExplanation, ImageExplanation

ANSI_BG = re.compile(r"\x1b\[48;2;(\d+);(\d+);(\d+)m")
TOKENS = ["<s>", "The", " <script>alert(1)</script>", " & \"q\"", "\n", " Paris", " is"]


def make(with_evicted: bool = True, **kw) -> Explanation:
    fields = dict(
        tokens=TOKENS, token_ids=list(range(10, 17)),
        relevance=torch.tensor([9.0, 0.5, -1.0, 0.25, 0.0, 2.0, -0.5]),
        target=" France", target_ids=[99], target_logit=12.5, method="attnlrp",
        evicted=torch.tensor([0, 0, 0, 0, 1, 0, 0], dtype=torch.bool) if with_evicted else None,
        layers={"layers.0.attn": torch.tensor([0.5, -0.5]), "layers.0.mlp": torch.arange(4.0)},
        prompt="The prompt")
    return Explanation(**(fields | kw))


def make_generation() -> GenerationExplanation:
    torch.manual_seed(0)
    matrix = torch.randn(3, 6)
    matrix[torch.arange(6) >= torch.arange(3, 6)[:, None]] = math.nan  # not earlier tokens
    evicted = torch.zeros(3, 6, dtype=torch.bool)
    evicted[2, 1] = True
    return GenerationExplanation(
        ["<s>", "Hi", " <b>you</b>"], [" there", "!", " ok"], matrix, "attnlrp",
        prompt_ids=[1, 2, 3], generated_ids=[4, 5, 6], target_logits=[1.0, 2.0, 3.0],
        evicted=evicted, prompt="Hi <b>you</b>")


def background_colors(text: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in ANSI_BG.findall(text)]


def assert_png(path, min_side: int = 50) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and min(img.shape[:2]) >= min_side
    assert img[..., :3].std() > 0.05, "image is (nearly) uniform"
    return img


# ----------------------------------------------------------------------------- colours


def test_colour_sign_and_intensity():
    assert hm.rgb(2.0, 2.0) == hm.POSITIVE == (255, 0, 0)  # max |r| -> full intensity
    assert hm.rgb(-2.0, 2.0) == hm.NEGATIVE == (0, 0, 255)
    assert hm.rgb(0.0, 2.0) == hm.rgb(math.nan, 2.0) == (255, 255, 255)
    r, g, b = hm.rgb(0.5, 2.0)
    assert r == 255 and g == b and 128 < g < 255  # positive: red channel dominant
    r, g, b = hm.rgb(-0.5, 2.0)
    assert b == 255 and r == g and 128 < r < 255  # negative: blue dominant
    assert hm.rgb(10.0, 2.0) == (255, 0, 0)  # beyond the scale: clamped
    weaker, stronger = hm.rgb(0.5, 2.0), hm.rgb(1.5, 2.0)
    assert stronger[1] < weaker[1]  # intensity grows with |r|


def test_colour_scale_skip_first():
    values = torch.tensor([10.0, -2.0, 1.0])
    assert hm.color_scale(values, skip_first=True) == 2.0
    assert hm.color_scale(values, skip_first=False) == 10.0
    assert hm.color_scale(torch.zeros(3)) == 1.0  # no division by zero
    assert hm.color_scale(torch.tensor([5.0])) == 5.0  # a lone token is its own scale
    assert hm.color_scale(torch.tensor([1.0, math.nan, -3.0])) == 3.0
    cells, scale = hm.token_cells(["a", "b", "c"], values, skip_first=True)
    assert scale == 2.0 and cells[1].color == (0, 0, 255) and cells[0].sink
    assert not hm.token_cells(["a", "b"], values[:2], skip_first=False)[0][0].sink


def test_terminal_colours_and_skip_first():
    e = make(with_evicted=False)
    out = e.to_terminal(width=200, color=True)
    colors = background_colors("\n".join(out.split("\n")[2:-1]))  # title, sink note, ..., legend
    assert len(colors) == len(TOKENS)
    assert colors[5] == (255, 0, 0)  # " Paris", the largest |r| once token 0 is skipped
    assert colors[2] == (128, 128, 255)  # -1.0 of scale 2.0
    assert colors[0] == (255, 0, 0)  # the sink is clamped, not the scale
    no_skip = background_colors(e.to_terminal(skip_first=False, width=200, color=True))
    assert no_skip[5] != (255, 0, 0) and no_skip[0] == (255, 0, 0)
    assert "attention sink" in out and "\x1b[4m" in out  # the sink is marked (underlined)


def test_terminal_plain_wraps_and_escapes_controls():
    e = make(tokens=["<s>", "a\x1b[31m"] + ["word"] * 5, token_ids=[],
             relevance=torch.ones(7), evicted=None)
    plain = e.to_terminal(color=False, width=20)
    assert "\x1b" not in plain  # neither our codes nor the token's own ESC
    body = plain.split("\n")[2:-1]
    assert len(body) > 1 and all(hm.display_width(line) <= 20 for line in body)
    assert "\u241b[31m" in plain


def test_evicted_rendered_distinctly():
    e = make()
    colored = e.to_terminal(width=200, color=True)
    assert "\x1b[9m" in colored  # strike-through
    assert (215, 215, 215) in background_colors(colored)
    assert "~\u21b5~[evicted]" in e.to_terminal(color=False, width=200)
    page = e.to_html()
    span = re.search(r'<span class="lucidlm-tok lucidlm-evicted"[^>]*>([^<]*)</span>', page)
    assert span and span.group(1) == "\u21b5" and "evicted" in html.unescape(span.group(0))
    assert page.count("lucidlm-evicted") == 2  # the CSS rule and the one evicted token
    assert e.top(10, skip_first=False)[-1][0] != 4 and 4 not in [i for i, *_ in e.top(10)]


# ----------------------------------------------------------------------------- HTML


def test_html_self_contained_and_escaped():
    e = make()
    page = e.to_html()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page  # the token "<script>" is text, and the page needs no JS
    for token in TOKENS:
        if "\n" not in token:
            assert html.escape(token, quote=True) in page
    assert "\u21b5</span><br>" in page  # newline: visible arrow plus a real line break
    assert "attnlrp" in page and html.escape(repr(" France")) in page  # header
    assert "linear-gradient" in page  # legend
    assert 'title="#5 &quot; Paris&quot;: +2"' in page  # tooltip with the value, the token quoted as JSON
    assert page.startswith("<!DOCTYPE html>")
    fragment = e._repr_html_()
    assert "<html" not in fragment and "lucidlm-tok" in fragment


def test_save_html_and_json_files(tmp_path):
    e = make()
    assert e.save_html(tmp_path / "e.html").read_text(encoding="utf-8") == e.to_html()
    path = e.save_json(tmp_path / "e.json")
    assert Explanation.from_json(path.read_text(encoding="utf-8")) == e
    assert sorted(os.listdir(tmp_path)) == ["e.html", "e.json"]


# ----------------------------------------------------------------------------- JSON


def test_json_round_trip():
    e = make(target_logit=math.nan)
    text = e.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = Explanation.from_json(text)
    assert back == e and back is not e
    assert math.isnan(back.target_logit) and back.tokens == TOKENS
    assert back.relevance.dtype == torch.float32 and torch.equal(back.relevance, e.relevance)
    assert back.evicted.dtype == torch.bool and torch.equal(back.evicted, e.evicted)
    assert torch.equal(back.layers["layers.0.mlp"], e.layers["layers.0.mlp"])
    assert ex.load_json(text) == e
    assert make(target_logit=1.0) != e and e != "not an explanation"
    minimal = make(with_evicted=False, layers=None, prompt=None)
    assert Explanation.from_json(minimal.to_json()) == minimal


def test_json_errors():
    with pytest.raises(ExplainError, match="GenerationExplanation"):
        GenerationExplanation.from_json(make().to_json())
    with pytest.raises(ExplainError, match="relevance"):
        data = make().to_dict()
        del data["relevance"]
        Explanation.from_dict(data)
    with pytest.raises(ExplainError):
        Explanation.from_json("{not json")


def test_validation():
    with pytest.raises(ExplainError, match="relevance"):
        make(relevance=torch.ones(3))
    with pytest.raises(ExplainError, match="evicted"):
        make(evicted=torch.zeros(2, dtype=torch.bool))
    assert make(relevance=torch.ones(7, dtype=torch.bfloat16)).relevance.dtype == torch.float32
    assert repr(make()).startswith("Explanation(target=' France'")
    assert "\x1b" not in str(make())  # pytest captures stdout: not a tty


# ----------------------------------------------------------------------------- files


def test_png_valid(tmp_path):
    img = assert_png(make().save_png(tmp_path / "e.png"))
    assert img.shape[1] > img.shape[0]  # laid out like text: wider than tall
    reds = (img[..., 0] > 0.9) & (img[..., 1] < 0.1) & (img[..., 2] < 0.1)
    blues = (img[..., 2] > 0.9) & (img[..., 0] < 0.1) & (img[..., 1] < 0.1)
    assert reds.sum() > 50 and blues.sum() > 50  # full-intensity boxes and the colour bar
    assert os.listdir(tmp_path) == ["e.png"]


def test_atomic_write(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    fileio.atomic_write(target, "old")
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0600

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]  # no temp left


def test_bad_output_paths(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "e.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        make().save_png(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        make().save_json(tmp_path / "file" / "e.json")
    with pytest.raises(IsADirectoryError):
        make().save_html(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["file"]


# ----------------------------------------------------------------------------- generation


def test_generation_rows():
    g = make_generation()
    r = g.row(1)
    assert r.tokens == ["<s>", "Hi", " <b>you</b>", " there"]
    assert torch.equal(r.relevance, g.matrix[1, :4]) and r.target == "!"
    assert r.token_ids == [1, 2, 3, 4] and r.target_ids == [5] and r.target_logit == 2.0
    assert g.row(-1).evicted.tolist() == [False, True, False, False, False]
    assert len(g.row(0).tokens) == 3 and not torch.isnan(g.row(2).relevance).any()
    with pytest.raises(IndexError):
        g.row(3)
    bare = GenerationExplanation(["a"], ["b"], torch.tensor([[1.0, 0.0]]), "attnlrp")
    assert bare.row(0).token_ids == [] and math.isnan(bare.row(0).target_logit)
    with pytest.raises(ExplainError, match="shape"):
        GenerationExplanation(["a"], ["b"], torch.ones(1, 3), "attnlrp")


def test_generation_json_and_renderings(tmp_path):
    g = make_generation()
    assert GenerationExplanation.from_json(g.to_json()) == g
    term = g.to_terminal(k=2, color=False)
    lines = term.split("\n")
    assert len(lines) == 4 and lines[2].lstrip().startswith("1 '!'")
    assert "[" in lines[3] and "<s>[" not in term  # values shown, sink left out of top lists
    assert len(background_colors(g.to_terminal(k=2, color=True))) == 6
    page = g.to_html()
    assert "http://" not in page and "https://" not in page
    assert page.count("<script") == 2  # our JSON data and our code; tokens are escaped
    assert "&lt;b&gt;you&lt;/b&gt;" in page and "<b>you" not in page.split("<script")[0]
    assert page.count('class="lucidlm-tok') == 6 and page.count("data-g=") == 3
    assert "\\u003cb>you" in page  # "<" escaped inside the JSON data too
    assert_png(g.save_png(tmp_path / "g.png"))
    assert g.save_html(tmp_path / "g.html").read_text(encoding="utf-8").startswith("<!DOCTYPE")
    assert "lucidlm-gen" in g._repr_html_()


# ----------------------------------------------------------------------------- images


def test_image_png_and_json(tmp_path):
    torch.manual_seed(0)
    relevance = torch.zeros(16, 16)
    relevance[:8] = 1.0
    relevance[8:] = -1.0
    e = ImageExplanation(relevance, torch.rand(3, 16, 16), "cat", 3.5, "attnlrp")
    for overlay in (True, False):
        img = assert_png(e.save_png(tmp_path / f"i{overlay}.png", overlay=overlay))
        assert (img[..., 0] > 0.9).any() and (img[..., 2] > 0.9).any()
    assert_png(ImageExplanation(relevance, None, "cat", 3.5, "attnlrp").save_png(tmp_path / "h.png"))
    assert ImageExplanation.from_json(e.to_json()) == e
    fragment = e._repr_html_()
    assert 'src="data:image/png;base64,' in fragment and "http" not in fragment
    with pytest.raises(ExplainError, match="image"):
        ImageExplanation(relevance, torch.rand(3, 8, 8), "cat", 3.5, "attnlrp")


def test_doctests():
    for module in (hm, render_html, render_png, render_terminal, ex):
        assert doctest.testmod(module).failed == 0

"""The viewer in a real browser (Playwright driving Debian's chromium; no browser is downloaded).

File mode: a saved Explanation / GenerationExplanation opened from disk. Server mode: the page
served at ``/`` generates (completion and chat), and clicking a generated token shows the same
relevances that ``/v1/explain`` and ``LLM.explain`` give.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
if not CHROMIUM.exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from lucidlm import LLM
from lucidlm.explain.explanation import Explanation, GenerationExplanation
from lucidlm.serve.viewer import viewer_page

RTOL, ATOL = 1e-4, 1e-5
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def tokens_of(page) -> list[dict]:
    """Every .tok as {index, relevance (str or None), classes, text, id}."""
    return page.eval_on_selector_all(".tok", """els => els.map(e => ({
        index: Number(e.dataset.index), relevance: e.dataset.relevance ?? null,
        classes: [...e.classList], text: e.textContent, title: e.title,
        id: e.dataset.tokenId === undefined ? null : Number(e.dataset.tokenId)}))""")


def relevances(page) -> dict[int, float]:
    """data-relevance of every token that has one, by data-index."""
    return {t["index"]: float(t["relevance"]) for t in tokens_of(page) if t["relevance"] is not None}


def assert_close(got, want) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL, equal_nan=True)


def open_file(page, tmp_path: Path, data: dict) -> None:
    path = tmp_path / "page.html"
    path.write_text(viewer_page(data), encoding="utf-8")
    page.goto(path.as_uri())


# ----------------------------------------------------------------------------- file mode

RELEVANCE = [3.0, 0.5, -0.25, 0.0, 1.0, -1.5]


def test_file_mode_explanation(page, tmp_path):
    layers = {f"layers.{i}.attn": torch.arange(4.0) - i for i in range(3)}
    layers |= {f"layers.{i}.mlp": torch.full((8,), 0.1 * i) for i in range(3)}
    e = Explanation(tokens=["<s>", "Hello", " </script><b>x</b>", "\n", " world", " again"],
                    token_ids=[1, 2, 3, 4, 5, 6], relevance=torch.tensor(RELEVANCE), target=" !",
                    target_ids=[7], target_logit=float("nan"), method="attnlrp",
                    evicted=torch.tensor([False, False, False, True, False, False]), layers=layers)
    open_file(page, tmp_path, e.to_dict())

    toks = tokens_of(page)
    assert [t["index"] for t in toks] == list(range(6))
    assert_close([float(t["relevance"]) for t in toks], RELEVANCE)
    assert [("evicted" in t["classes"]) for t in toks] == [False, False, False, True, False, False]
    assert "sink" in toks[0]["classes"]  # token 0 beyond the scale (which leaves it out) is outlined
    assert toks[1]["title"].endswith("+0.5")  # hover shows the value
    # token text is text, never markup; a newline shows as ↵ and breaks the line
    assert toks[2]["text"] == " </script><b>x</b>" and page.locator("#tokens b").count() == 0
    assert toks[3]["text"] == "\u21b5" and page.locator("#tokens br").count() == 1
    assert page.locator("#generate-panel").is_hidden()  # no server controls in file mode
    assert page.text_content("#head-target") == '" !"' and page.text_content("#head-score") == "n/a"
    cells = page.locator("#layers-grid td.cell")
    assert cells.count() == 3 * (4 + 1)  # 3 layers x (4 heads + MLP)
    mlp = page.locator('#layers-grid td[data-layer="2"][data-head="mlp"]')
    assert float(mlp.get_attribute("data-relevance")) == pytest.approx(1.6, rel=1e-5)


def test_file_mode_generation_rows(page, tmp_path):
    n_prompt, n_gen = 3, 3
    matrix = torch.arange(n_gen * (n_prompt + n_gen), dtype=torch.float32).reshape(n_gen, -1) - 7.5
    evicted = torch.zeros(n_gen, n_prompt + n_gen, dtype=torch.bool)
    evicted[2, 1] = True
    g = GenerationExplanation(["<s>", "A", " B"], [" C", " D", " E"], matrix, "cp-lrp",
                              prompt_ids=[1, 2, 3], generated_ids=[4, 5, 6], evicted=evicted)
    open_file(page, tmp_path, g.to_dict())

    assert page.locator(".tok").count() == 6 and page.locator(".tok.gen").count() == n_gen
    assert sorted(relevances(page)) == [0, 1, 2, 3, 4]  # the last row is shown first
    assert "evicted" in page.get_attribute('.tok[data-index="1"]', "class")

    page.click('.tok[data-index="4"]')  # generated token 1
    got = relevances(page)
    assert sorted(got) == [0, 1, 2, 3]
    assert_close([got[j] for j in range(4)], matrix[1, :4].tolist())
    assert "selected" in page.get_attribute('.tok[data-index="4"]', "class")
    assert "evicted" not in page.get_attribute('.tok[data-index="1"]', "class")
    assert page.text_content("#head-method") == "cp-lrp"
    assert page.locator("#layers-panel").is_hidden()


# ----------------------------------------------------------------------------- server mode


@pytest.fixture(scope="module")
def llm(tiny_lm_dir):
    return LLM.load(tiny_lm_dir)


def serve(llm, **options):
    from serve_util import running_server

    return running_server(llm, **options)


def wait_generated(page) -> list[dict]:
    page.wait_for_function("document.body.dataset.phase === 'idle' && document.querySelector('.tok.gen')")
    return tokens_of(page)


def explain_click(page, index: int, method: str) -> dict[int, float]:
    page.click(f'.tok[data-index="{index}"]')
    page.wait_for_selector(f'#tokens[data-explained="{index}:{method}"]')
    return relevances(page)


def api_explain(url: str, ids: list[int], index: int, method: str, **extra) -> dict:
    import httpx

    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "input_ids": ids[:index], "target": ids[index], "method": method, **extra}
    resp = httpx.post(f"{url}/v1/explain", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def nan_none(values) -> list[float]:
    return [math.nan if v is None else v for v in values]


def test_server_mode_completion(page, llm, tmp_path):
    with serve(llm) as url:
        page.goto(f"{url}/")
        page.fill("#prompt", "The capital of France is")
        page.fill("#max-tokens", "6")
        page.fill("#temperature", "0")
        page.click("#generate")
        toks = wait_generated(page)
        gen = [t for t in toks if "gen" in t["classes"]]
        assert 1 <= len(gen) <= 6
        assert [t["index"] for t in toks] == list(range(len(toks)))
        ids = [t["id"] for t in toks]
        n_prompt = len(toks) - len(gen)
        assert ids[:n_prompt] == llm.tokenizer.encode("The capital of France is")

        index = gen[len(gen) // 2]["index"]
        got = {}
        for method in ("attnlrp", "cp-lrp"):
            if method == "attnlrp":
                got[method] = explain_click(page, index, method)
            else:  # changing the method re-explains the selected token
                page.select_option("#method", method)
                page.wait_for_selector(f'#tokens[data-explained="{index}:{method}"]')
                got[method] = relevances(page)
            assert sorted(got[method]) == list(range(index))  # earlier tokens only
            values = [got[method][j] for j in range(index)]
            api = api_explain(url, ids, index, method, layers=True)
            assert_close(values, nan_none(api["relevance"]))
            want = llm.explain(ids[:index], target=ids[index], method=method).relevance
            assert_close(values, want.tolist())
        assert not torch.allclose(torch.tensor([got["attnlrp"][j] for j in range(index)]),
                                  torch.tensor([got["cp-lrp"][j] for j in range(index)]))
        classes = page.get_attribute(f'.tok[data-index="{index}"]', "class")
        assert "selected" in classes
        later = [t for t in tokens_of(page) if t["index"] > index]
        assert all(t["relevance"] is None for t in later)
        n_layers, n_heads = llm.config.n_layer, llm.config.n_head
        assert page.locator("#layers-grid td.cell").count() == n_layers * (n_heads + 1)
        assert page.locator("#error").is_hidden()

        shot = tmp_path / "viewer.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("LUCIDLM_SCREENSHOT_DIR"):
            target = Path(os.environ["LUCIDLM_SCREENSHOT_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, target / shot.name)


def test_server_mode_chat(page, llm):
    with serve(llm) as url:
        page.goto(f"{url}/")
        page.check('input[name="mode"][value="chat"]')
        assert page.text_content("#generate") == "Send"
        page.fill("#prompt", "Hi there!")
        page.fill("#max-tokens", "5")
        page.click("#generate")
        toks = wait_generated(page)
        assert page.locator(".bubble.user").all_text_contents() == ["Hi there!"]
        assert page.locator(".bubble.assistant").count() == 1
        ids = [t["id"] for t in toks]
        chat_ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Hi there!"}],
                                             add_generation_prompt=True)
        assert ids[:len(chat_ids)] == chat_ids
        index = next(t["index"] for t in toks if "gen" in t["classes"])
        got = explain_click(page, index, "attnlrp")
        assert sorted(got) == list(range(index))
        want = llm.explain(ids[:index], target=ids[index], method="attnlrp").relevance
        assert_close([got[j] for j in range(index)], want.tolist())


def test_server_mode_kv_cache_and_errors(page, llm):
    with serve(llm, kv_cache="window", cache_tokens=4, api_key="sesame") as url:
        page.goto(f"{url}/")
        page.wait_for_selector("#error:not([hidden])")  # /v1/models refused without the key
        assert "API key" in page.text_content("#error")
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        assert page.is_visible("#kv-label") and page.is_checked("#kv-cache")
        assert "window, 4 tokens" in page.text_content("#kv-text")
        page.fill("#prompt", "one two three four five six seven")
        page.fill("#max-tokens", "3")
        page.click("#generate")
        toks = wait_generated(page)
        assert page.locator("#error").is_hidden()
        index = next(t["index"] for t in toks if "gen" in t["classes"])
        explain_click(page, index, "attnlrp")
        evicted = [t["index"] for t in tokens_of(page) if "evicted" in t["classes"]]
        assert evicted and max(evicted) < index - 1  # the window keeps the latest tokens
        assert page.locator("#layers-panel").is_hidden()  # no latent relevances under a KV policy

        page.fill("#contrast", "not a token of this vocabulary at all")
        page.dispatch_event("#contrast", "change")  # a contrast re-explains: this one is refused
        page.wait_for_selector("#error:not([hidden])")
        assert page.text_content("#error").startswith("Explain failed: ")


# ----------------------------------------------------------------------------- the HTML export


def test_generation_export_uses_the_same_renderer(page, tmp_path):
    """GenerationExplanation.save_html inlines the viewer's renderer (lucidlm/render/static/heatmap.js):
    hovering a generated token recolours the earlier tokens in exactly the colours Python draws."""
    matrix = torch.tensor([[3.0, -1.0, 0.5, 0.0, 0.0, 0.0], [2.0, 0.25, -2.0, 1.0, 0.0, 0.0],
                           [1.0, 1.0, 1.0, 1.0, -1.0, 0.0]])
    evicted = torch.zeros(3, 6, dtype=torch.bool)
    evicted[1, 1] = True
    g = GenerationExplanation(["<s>", "Hi", " <b>you</b>"], [" there", "!", " ok"], matrix, "attnlrp",
                              evicted=evicted)
    page.goto(g.save_html(tmp_path / "g.html").as_uri())
    page.hover('.lucidlm-gen[data-g="1"]')
    assert "generated token 1" in page.text_content(".lucidlm-info")
    spans = page.eval_on_selector_all(".lucidlm-tok", """els => els.map(e => ({bg: e.style.background,
        classes: [...e.classList], title: e.title, relevance: e.dataset.relevance ?? null}))""")
    cells, _ = g.row(1).cells()
    assert [s["bg"] for s in spans[:4]] == ["rgb({}, {}, {})".format(*c.color) for c in cells]
    assert [float(s["relevance"]) for s in spans[:4]] == matrix[1, :4].tolist()
    assert "lucidlm-sink" in spans[0]["classes"] and "lucidlm-evicted" in spans[1]["classes"]
    assert "lucidlm-current" in spans[4]["classes"] and "lucidlm-future" in spans[5]["classes"]
    assert spans[5]["bg"] == "" and spans[2]["title"] == cells[2].label()  # the tooltip Python writes
    page.click('.lucidlm-gen[data-g="0"]')  # pin token 0: hovering another one keeps it
    page.hover('.lucidlm-gen[data-g="2"]')
    info = page.text_content(".lucidlm-info")
    assert "generated token 0" in info and "pinned" in info


# ----------------------------------------------------------------------------- diff mode


def diff_rows_of(page) -> list[dict]:
    """Every .diff-row as {key, label, values (by data-index), colours}."""
    return page.eval_on_selector_all(".diff-row", """rows => rows.map(r => ({key: r.dataset.row,
        label: r.querySelector('.diff-label').textContent,
        values: [...r.querySelectorAll('.dtok')].map(s => Number(s.dataset.relevance)),
        colours: [...r.querySelectorAll('.dtok')].map(s => s.style.background)}))""")


def test_file_mode_diff(page, tmp_path):
    from lucidlm.explain.diff import ExplanationDiff

    tokens = ["<s>", "The", " </script>", "\n", " answer"]
    base = Explanation(tokens, [1, 2, 3, 4, 5], torch.tensor([3.0, 0.5, -0.25, 0.0, 1.0]), " 42", [42], 12.25,
                       "cp-lrp")
    tuned = Explanation(tokens, [1, 2, 3, 4, 5], torch.tensor([2.0, 1.5, 0.25, -0.5, 0.5]), " 42", [42], 15.0,
                        "cp-lrp")
    d = ExplanationDiff(base, tuned, torch.tensor([1.0, 1.0, 0.5, -0.5, 0.0]))
    open_file(page, tmp_path, d.to_dict())
    page.wait_for_selector('#tokens[data-explained="-1:cp-lrp:diff"]')

    rows = diff_rows_of(page)
    python_rows, _ = d.cells()
    assert [r["key"] for r in rows] == ["base", "tuned", "difference", "adapter"]
    assert [r["label"] for r in rows] == [label for _, label, _ in d.rows()]  # the labels Python writes
    for got, (_, _, values), row in zip(rows, d.rows(), python_rows):
        assert_close(got["values"], values.tolist())
        # one colour scale, the colours Python draws: a value looks the same in every row
        assert got["colours"] == ["rgb({}, {}, {})".format(*c.color) for c in row.cells]
    assert_close([relevances(page)[j] for j in range(5)], d.relevance.tolist())  # the tokens show tuned − base
    assert page.text_content("#head-score") == "12.25 \u2192 15 (+2.75)"
    assert page.locator("#diff-panel").is_visible() and page.locator("#layers-panel").is_hidden()
    assert page.locator("#tokens script, .diff-row script").count() == 0  # token text is text
    assert page.locator("#error").is_hidden()


@pytest.fixture(scope="module")
def tuned_llm(tiny_lm_dir, tmp_path_factory):
    from diff_util import save_opened_adapter

    return LLM.load(tiny_lm_dir, adapter=save_opened_adapter(tiny_lm_dir, tmp_path_factory.mktemp("adapter")))


def test_server_mode_diff(page, llm, tuned_llm, tiny_lm_dir):
    with serve(llm) as url:  # no base: no diff toggle
        page.goto(f"{url}/")
        page.wait_for_function("document.getElementById('status').textContent.includes('context')")
        assert page.locator("#diff-label").is_hidden()
    with serve(tuned_llm, base=lambda: LLM.load(tiny_lm_dir)) as url:
        page.goto(f"{url}/")
        page.wait_for_selector("#diff-label:not([hidden])")
        page.fill("#prompt", "The capital of France is")
        page.fill("#max-tokens", "4")
        page.click("#generate")
        toks = wait_generated(page)
        ids = [t["id"] for t in toks]
        index = next(t["index"] for t in toks if "gen" in t["classes"])
        page.check("#diff")
        page.click(f'.tok[data-index="{index}"]')
        page.wait_for_selector(f'#tokens[data-explained="{index}:attnlrp:diff"]')

        want = tuned_llm.explain_diff(llm, ids[:index], target=ids[index], method="attnlrp")
        rows = diff_rows_of(page)
        assert [r["key"] for r in rows] == ["base", "tuned", "difference", "adapter"]
        assert [r["label"] for r in rows] == [label for _, label, _ in want.rows()]
        for got, (_, _, values) in zip(rows, want.rows()):
            assert_close(got["values"], values.tolist())
        got = relevances(page)
        assert sorted(got) == list(range(index))
        assert_close([got[j] for j in range(index)], want.relevance.tolist())
        assert "selected" in page.get_attribute(f'.tok[data-index="{index}"]', "class")

        page.uncheck("#diff")  # back to one explanation of the same token
        page.wait_for_selector(f'#tokens[data-explained="{index}:attnlrp"]')
        assert page.locator("#diff-panel").is_hidden()
        plain = tuned_llm.explain(ids[:index], target=ids[index], method="attnlrp").relevance
        assert_close([relevances(page)[j] for j in range(index)], plain.tolist())
        assert page.locator("#error").is_hidden()

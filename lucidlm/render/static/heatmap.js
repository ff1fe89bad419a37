// lucidlm's one JavaScript renderer of relevance heatmaps. The HTML export of a
// GenerationExplanation (lucidlm.render.html) and the viewer page (lucidlm.serve.viewer) both inline
// this file. It mirrors lucidlm.render.cells (the colour map, the colour scale, how a token is shown,
// the sink and eviction marks, the one scale of stacked rows such as a diff's), so a token looks the
// same whichever side drew it, and it reads
// explanations in their wire format (README, "Wire format"): plain JSON numbers, and the strings
// "NaN", "Infinity", "-Infinity" for the floats JSON cannot spell.
// Plain DOM, no framework: a saved page must open from disk in any browser.
var lucidlmHeatmap = (function () {
  "use strict";

  const POSITIVE = [255, 0, 0];
  const NEGATIVE = [0, 0, 255];
  const EVICTED = [215, 215, 215]; // grey: no sign, so it cannot be mistaken for a relevance colour
  const EVICTED_TEXT = [110, 110, 110];
  const NOTES = {
    sink: "attention sink, excluded from the colour scale",
    evicted: "evicted from the KV cache: the model no longer saw this token",
  };

  // A number of the wire format ("NaN" and the infinities arrive as strings; null or absent: NaN).
  function number(value) {
    return value === null || value === undefined ? NaN : Number(value);
  }

  // -------------------------------------------------------------------------------- colours
  // White at 0, blending linearly to full red at +scale and full blue at -scale; NaN draws white.
  function rgb(value, scale) {
    const v = Number.isFinite(value) ? value : 0;
    const t = Math.min(Math.abs(v) / scale, 1);
    const end = v > 0 ? POSITIVE : NEGATIVE;
    return end.map((e) => Math.round(255 + (e - 255) * t));
  }

  // Black or white text, whichever reads better on the background (full blue needs white).
  function textColor([r, g, b]) {
    return 0.299 * r + 0.587 * g + 0.114 * b >= 128 ? [0, 0, 0] : [255, 255, 255];
  }

  function hex(color) {
    return "#" + color.map((c) => c.toString(16).padStart(2, "0")).join("");
  }

  // The |value| drawn at full colour: the largest finite |value|. With skipFirst, token 0 is left
  // out (an attention sink would wash out every other token) unless it is the only one.
  function colorScale(values, skipFirst) {
    let top = 0;
    values.forEach((v, i) => {
      const counted = !skipFirst || i > 0 || values.length === 1;
      if (counted && Number.isFinite(v)) top = Math.max(top, Math.abs(v));
    });
    return top > 0 ? top : 1; // all zero: any scale draws it white
  }

  // Like Python's f"{v:+.4g}" for values of ordinary size.
  function fmt(value, digits = 4) {
    if (!Number.isFinite(value)) return "n/a";
    const short = Number(value.toPrecision(digits));
    return (short >= 0 ? "+" : "") + String(short);
  }

  // -------------------------------------------------------------------------------- tokens
  // Control characters become visible symbols; spaces stay spaces (the page keeps them with
  // white-space: pre-wrap); an empty token shows as ∅.
  const SYMBOLS = { "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d" };

  function visible(token) {
    let out = "";
    for (const ch of token) {
      const code = ch.codePointAt(0);
      if (SYMBOLS[ch]) out += SYMBOLS[ch];
      else if (code < 32) out += String.fromCodePoint(0x2400 + code);
      else if (code === 127) out += "\u2421";
      else if (code >= 0x80 && code < 0xa0) out += "\ufffd";
      else out += ch;
    }
    return out || "\u2205";
  }

  function tokenName(index, token) {
    return `#${index} ${JSON.stringify(token)}`;
  }

  // Like Python's f"{v:.4g}" for values of ordinary size (no sign for positives).
  function short(value) {
    return Number.isFinite(value) ? String(Number(value.toPrecision(4))) : "n/a";
  }

  // What each token of one row is drawn with, and the row's colour scale (token_cells in Python):
  // values are numbers, evicted a list of booleans or null; `scale` defaults to the row's own.
  function cells(values, evicted, skipFirst = true, scale = colorScale(values, skipFirst)) {
    const drawn = values.map((value, j) => {
      const gone = Boolean(evicted && evicted[j]);
      const color = gone ? EVICTED : rgb(value, scale);
      return { value, color, fg: gone ? EVICTED_TEXT : textColor(color), evicted: gone,
               sink: skipFirst && j === 0 && values.length > 1 };
    });
    return { scale, cells: drawn };
  }

  // Sentences on the marked tokens of a row, as every rendering's header has them (cell_notes).
  function notes(row, tokens) {
    const out = row.cells.filter((c) => c.sink).map((c) =>
      `token 0 ${JSON.stringify(tokens[0])} (${fmt(c.value, 3)}) is an ${NOTES.sink}`);
    const gone = row.cells.filter((c) => c.evicted).length;
    if (gone) out.push(`${gone} token(s) evicted from the KV cache (grey, struck through)`);
    return out;
  }

  // Paints the token elements `spans` (tokens[j] in spans[j]) with a row of cells(): a token
  // before row.cells.length other than `selected` gets its colour, its value (data-relevance) and
  // a tooltip; `selected` (-1: none) is marked as the explained token and the tokens after it as
  // not seen. `classes` names the page's CSS classes: {selected, future, evicted, sink}.
  function paint(spans, tokens, row, selected, classes) {
    spans.forEach((span, j) => {
      const cell = j < row.cells.length && j !== selected ? row.cells[j] : null;
      span.classList.toggle(classes.selected, j === selected);
      span.classList.toggle(classes.future, selected >= 0 && j > selected);
      span.classList.toggle(classes.evicted, Boolean(cell && cell.evicted));
      span.classList.toggle(classes.sink, Boolean(cell && cell.sink));
      span.style.background = cell ? hex(cell.color) : "";
      span.style.color = cell ? hex(cell.fg) : "";
      if (cell) span.dataset.relevance = String(cell.value);
      else span.removeAttribute("data-relevance");
      const marks = [];
      if (cell && cell.evicted) marks.push(NOTES.evicted);
      if (cell && cell.sink) marks.push(NOTES.sink);
      const value = cell ? `: ${fmt(cell.value)}` : j === selected ? ": explained token" : "";
      span.title = [tokenName(j, tokens[j]) + value, ...marks].join("; ");
    });
  }

  // -------------------------------------------------------------------------------- stacks, diffs
  // Rows {key, label, values} over the same tokens, coloured on ONE scale (stacked_cells in Python):
  // the largest finite |value| of any row, token 0 of each left out with skipFirst. Each row comes
  // back as a row of cells() (plus its key and label), so paint() and notes() draw it.
  function stackCells(rows, evicted, skipFirst = true) {
    const kept = rows.flatMap((r) => (skipFirst && r.values.length > 1 ? r.values.slice(1) : r.values));
    const scale = colorScale(kept, false);
    return { scale, rows: rows.map((r) => ({ key: r.key, label: r.label,
                                             ...cells(r.values, evicted, skipFirst, scale) })) };
  }

  // The rows of an ExplanationDiff's wire form `d` as every rendering stacks them
  // (ExplanationDiff.rows in Python): base, tuned, their difference, and the part of the tuned
  // relevance that came through the adapter when the tuned model had adapter branches.
  function diffRows(d) {
    const label = d.tuned.score_label || "logit";
    const rows = [
      { key: "base", label: `base (${label} ${short(number(d.base.target_logit))})`,
        values: d.base.relevance.map(number) },
      { key: "tuned", label: `tuned (${label} ${short(number(d.tuned.target_logit))})`,
        values: d.tuned.relevance.map(number) },
      { key: "difference", label: `tuned \u2212 base (${fmt(number(d.logit_delta))})`,
        values: d.relevance.map(number) },
    ];
    if (d.adapter_relevance) {
      rows.push({ key: "adapter", label: "through the adapter", values: d.adapter_relevance.map(number) });
    }
    return rows;
  }

  // Replaces the children of `box` by stacked rows (stackCells().rows), each a div.diff-row[data-row=KEY]
  // holding its .diff-label and a .diff-tokens box of span.dtok[data-index] painted as paint() does.
  function drawStack(box, tokens, rows, classes) {
    box.replaceChildren();
    for (const row of rows) {
      const line = element("div", "diff-row", box);
      line.dataset.row = row.key;
      element("div", "diff-label", line).textContent = row.label;
      const text = element("div", "diff-tokens", line);
      const spans = row.cells.map((_, j) => {
        const span = element("span", "dtok", text);
        span.dataset.index = String(j);
        span.textContent = visible(tokens[j]);
        for (let n = tokens[j].split("\n").length - 1; n > 0; n--) element("br", "", text);
        return span;
      });
      paint(spans, tokens, row, -1, classes);
    }
  }

  function element(tag, className, parent) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    parent.appendChild(node);
    return node;
  }

  // -------------------------------------------------------------------------------- latent relevances
  // The numbers of a (nested) list of the wire format, flat.
  function flatten(value) {
    return Array.isArray(value) ? value.flatMap(flatten) : [number(value)];
  }

  // Fills the table `grid` with latent relevances (an explanation's `layers`): rows = layers, columns =
  // attention heads ("layers.L.attn") and the MLP's total ("layers.L.mlp" summed, with a shared expert's
  // "layers.L.shared_mlp"), all on one colour
  // scale of their own, which it returns (null when there is nothing to show). Cells are
  // td.cell[data-layer][data-head] (data-head "mlp" for the MLP) with data-relevance and a tooltip.
  function drawLayers(grid, layers) {
    grid.replaceChildren();
    const rows = new Map();
    for (const [key, value] of Object.entries(layers || {})) {
      const m = /^layers\.(\d+)\.(attn|mlp|shared_mlp)$/.exec(key);
      if (!m) continue;
      const layer = Number(m[1]);
      if (!rows.has(layer)) rows.set(layer, { attn: [], mlp: NaN });
      if (m[2] === "attn") rows.get(layer).attn = flatten(value);
      else rows.get(layer).mlp = flatten(value).reduce((a, b) => a + b, rows.get(layer).mlp || 0);
    }
    if (!rows.size) return null;
    const heads = Math.max(...[...rows.values()].map((r) => r.attn.length));
    const scale = colorScale([...rows.values()].flatMap((r) => [...r.attn, r.mlp]), false);
    const head = grid.insertRow();
    element("th", "", head).textContent = "layer";
    for (let h = 0; h < heads; h++) element("th", "", head).textContent = `h${h}`;
    element("th", "", head).textContent = "MLP";
    for (const layer of [...rows.keys()].sort((a, b) => a - b)) {
      const row = grid.insertRow();
      const { attn, mlp } = rows.get(layer);
      element("th", "", row).textContent = String(layer);
      for (let h = 0; h < heads; h++) layerCell(row, layer, String(h), attn[h], scale, `head ${h}`);
      layerCell(row, layer, "mlp", mlp, scale, "MLP total");
    }
    return scale;
  }

  function layerCell(row, layer, head, value, scale, what) {
    const cell = element("td", head === "mlp" ? "cell mlp" : "cell", row);
    cell.dataset.layer = String(layer);
    cell.dataset.head = head;
    const v = number(value);
    cell.style.background = hex(rgb(v, scale));
    cell.title = `layer ${layer} ${what}: ${fmt(v)}`;
    if (Number.isFinite(v)) cell.dataset.relevance = String(value);
  }

  // -------------------------------------------------------------------------------- generations
  // Generated token i of a GenerationExplanation's wire form `g`: the relevance of every earlier
  // token (row i of the matrix, up to the token), which of them were evicted, and the token's logit.
  function generationRow(g, i) {
    const index = g.prompt_tokens.length + i;
    return {
      index,
      values: g.matrix[i].slice(0, index).map(number),
      evicted: g.evicted ? g.evicted[i].slice(0, index) : null,
      target: g.generated_tokens[i],
      score: g.target_logits ? number(g.target_logits[i]) : NaN,
    };
  }

  // The HTML export of a GenerationExplanation: `root` holds the token spans (.lucidlm-tok, the
  // generated ones .lucidlm-gen[data-g]), the wire form in script.lucidlm-data and .lucidlm-info.
  // Hovering a generated token shows its row; a click pins it; leaving shows the last one again.
  function generationPage(root) {
    const g = JSON.parse(root.querySelector("script.lucidlm-data").textContent);
    const tokens = g.prompt_tokens.concat(g.generated_tokens);
    const spans = Array.from(root.querySelectorAll(".lucidlm-tok"));
    const info = root.querySelector(".lucidlm-info");
    const classes = { selected: "lucidlm-current", future: "lucidlm-future", evicted: "lucidlm-evicted",
                      sink: "lucidlm-sink" };
    const skipFirst = root.dataset.skipFirst !== "0";
    let pinned = -1;
    function show(i) {
      const row = generationRow(g, i);
      const drawn = cells(row.values, row.evicted, skipFirst);
      paint(spans, tokens, drawn, row.index, classes);
      info.textContent = `Relevance for generated token ${i} ${JSON.stringify(visible(row.target))}`
        + ` (colour scale \u00b1${Number(drawn.scale.toPrecision(3))})`
        + (pinned >= 0 ? " - pinned, click it again to unpin" : " - click to pin");
    }
    root.querySelectorAll(".lucidlm-gen").forEach((span) => {
      const i = Number(span.getAttribute("data-g"));
      span.addEventListener("mouseenter", () => { if (pinned < 0) show(i); });
      span.addEventListener("click", () => { pinned = pinned === i ? -1 : i; show(i); });
    });
    root.addEventListener("mouseleave", () => {
      if (pinned < 0 && g.generated_tokens.length) show(g.generated_tokens.length - 1);
    });
  }

  return { number, rgb, textColor, hex, colorScale, fmt, short, visible, tokenName, cells, notes, paint,
           stackCells, diffRows, drawStack, drawLayers, generationRow, generationPage };
})();

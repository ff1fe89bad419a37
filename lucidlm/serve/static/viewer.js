// lucidlm viewer: generate text on a lucidlm server and explain any generated token, or show a
// saved explanation ("file mode"). Plain DOM code, no framework and nothing fetched but the
// server's own API (relative URLs, so the page works wherever the server is reached from).
//
// Stable DOM hooks (tests and scripts rely on them):
//   .tok[data-index]       every token, index into prompt ids + generated ids
//   .tok[data-relevance]   the relevance of an earlier token for the selected one (a number)
//   .tok.gen / .selected / .evicted
//   #tokens[data-explained="INDEX:METHOD"]   set once an explanation is drawn ("INDEX:METHOD:diff" for a
//                                            diff; INDEX is -1 for a saved explanation or diff)
//   #diff-rows .diff-row[data-row=KEY]       a diff's rows, KEY base | tuned | difference | adapter, each
//     .diff-label and .dtok[data-index][data-relevance]   with its label and tokens (one colour scale)
//   body[data-phase]       "idle" | "generating" | "explaining"
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  // The one renderer of lucidlm's heatmaps (lucidlm/render/static/heatmap.js, inlined before this
  // file): colours, colour scale, token display, painting; explanations arrive in the wire format.
  const H = lucidlmHeatmap;
  const CLASSES = { selected: "selected", future: "future", evicted: "evicted", sink: "sink" };

  function tokenName(index) {
    return H.tokenName(index, state.tokens[index]);
  }

  // -------------------------------------------------------------------------------- state
  const state = {
    fileMode: false,
    model: null, // model id, from GET /v1/models
    health: null, // GET /health
    ids: [], // prompt ids then generated ids (server mode)
    tokens: [], // their display strings
    spans: [], // their elements
    nPrompt: 0,
    selected: -1,
    chat: [], // the conversation: [{role, content}]
    generation: null, // AbortController of the running generation
    explainSeq: 0, // numbers explain requests: an answer to an older click is dropped
    file: null, // the embedded GenerationExplanation (file mode)
  };

  function setPhase(phase) {
    document.body.dataset.phase = phase;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  // -------------------------------------------------------------------------------- token view
  function clearTokens() {
    $("tokens").replaceChildren();
    $("tokens").removeAttribute("data-explained");
    Object.assign(state, { ids: [], tokens: [], spans: [], nPrompt: 0, selected: -1 });
    state.explainSeq++; // an explanation still on its way belongs to the tokens just removed
    $("explain-head").hidden = true;
    showLayers(null);
    showDiffRows(null);
  }

  // Appends tokens as spans; `generated` ones are clickable. A token holding newlines is shown
  // with its ↵ symbols and then as many line breaks, so the text keeps its lines.
  function appendTokens(tokens, ids, generated) {
    const box = $("tokens");
    tokens.forEach((token, k) => {
      const index = state.spans.length;
      const span = document.createElement("span");
      span.className = generated ? "tok gen" : "tok";
      span.dataset.index = String(index);
      if (ids && ids[k] !== undefined) span.dataset.tokenId = String(ids[k]);
      span.textContent = H.visible(token);
      state.tokens.push(token);
      state.spans.push(span);
      span.title = tokenName(index);
      box.appendChild(span);
      for (let n = token.split("\n").length - 1; n > 0; n--) box.appendChild(document.createElement("br"));
    });
  }

  // Draws one explanation over the token view: ex = {selected, relevance (wire-format numbers),
  // evicted, target, method, score, label (what score is: "logit", "log-prob", ...), layers}.
  // Tokens from relevance.length on are cleared.
  function showExplanation(ex) {
    const row = H.cells(ex.relevance.map(H.number), ex.evicted, true);
    state.selected = ex.selected;
    H.paint(state.spans, state.tokens, row, ex.selected, CLASSES);
    showHead(ex, row);
    showLayers(ex.layers);
    showDiffRows(null);
  }

  // Draws an ExplanationDiff's wire form `d`: the token view coloured by the difference (tuned −
  // base), and under it the labelled rows (base, tuned, difference, adapter) on one colour scale.
  function showDiff(d, selected) {
    const stack = H.stackCells(H.diffRows(d), d.tuned.evicted, true);
    const difference = stack.rows.find((r) => r.key === "difference");
    state.selected = selected;
    H.paint(state.spans, state.tokens, difference, selected, CLASSES);
    const t = d.tuned;
    showHead({ target: t.target, method: t.method, label: t.score_label || "logit", score: t.target_logit },
             difference);
    $("head-score").textContent = `${H.short(H.number(d.base.target_logit))} \u2192 ` +
      `${H.short(H.number(t.target_logit))} (${H.fmt(H.number(d.logit_delta))})`;
    $("head-score").parentElement.title = "the base model's score \u2192 the tuned model's (the change)";
    $("head-note").textContent = ["tokens above coloured by tuned \u2212 base", ...H.notes(difference, state.tokens)]
      .join(" · ");
    showLayers(null);
    showDiffRows(stack);
  }

  // A diff's rows (H.stackCells), each its label over its own copy of the tokens; null hides them.
  function showDiffRows(stack) {
    $("diff-panel").hidden = !stack;
    H.drawStack($("diff-rows"), state.tokens, stack ? stack.rows : [], CLASSES);
  }

  function showHead(ex, row) {
    $("head-target").textContent = JSON.stringify(H.visible(String(ex.target)));
    $("head-method").textContent = ex.method;
    showScore(ex.label, ex.score);
    $("legend-min").textContent = H.fmt(-row.scale, 3);
    $("legend-max").textContent = H.fmt(row.scale, 3);
    $("head-note").textContent = H.notes(row, state.tokens).join(" · ");
    $("explain-head").hidden = false;
  }

  // What the score is, before its value: "log-prob -3.2", "logit difference 1.5" (the page's
  // "score" word is replaced by the label the server or the saved file gives).
  const SCORE_NOTES = {
    "logit": "the target token's logit",
    "logit difference": "logit(target) \u2212 logit(contrast)",
    "log-prob": "sum of the continuation's token log-probabilities",
    "logit sum": "sum of the continuation's token logits",
  };

  function showScore(label, score) {
    const value = $("head-score");
    const name = typeof label === "string" && label ? label : "logit";
    const word = value.previousSibling;
    if (word && word.nodeType === Node.TEXT_NODE) word.textContent = `${name} `;
    else value.before(document.createTextNode(`${name} `));
    value.parentElement.title = SCORE_NOTES[name] || name;
    value.dataset.label = name;
    const number = H.number(score);
    value.textContent = Number.isFinite(number) ? String(Number(number.toPrecision(5))) : "n/a";
  }

  // Grid of latent relevances (H.drawLayers: rows = layers, columns = heads and the MLP), one scale.
  function showLayers(layers) {
    const scale = H.drawLayers($("layers-grid"), layers);
    $("layers-panel").hidden = scale === null;
    if (scale === null) return;
    $("layers-min").textContent = H.fmt(-scale, 3);
    $("layers-max").textContent = H.fmt(scale, 3);
  }

  // -------------------------------------------------------------------------------- file mode
  function startFileMode(data) {
    state.fileMode = true;
    setPhase("idle");
    if (data.type === "Explanation") showFileExplanation(data);
    else if (data.type === "GenerationExplanation") showFileGeneration(data);
    else if (data.type === "ExplanationDiff") showFileDiff(data);
    else {
      showError(`Cannot show ${JSON.stringify(data.type)}: expected an Explanation, a GenerationExplanation ` +
                "or an ExplanationDiff.");
    }
  }

  // The prompt tokens of a saved explanation, then its target (no input, so no .tok).
  function appendSaved(e) {
    appendTokens(e.tokens, e.token_ids && e.token_ids.length ? e.token_ids : null, false);
    const target = document.createElement("span");
    target.className = "target-tok";
    target.textContent = H.visible(e.target);
    target.title = `target ${JSON.stringify(e.target)}`;
    $("tokens").appendChild(target);
  }

  function showFileDiff(d) {
    $("status").textContent = `saved diff · ${d.tuned.tokens.length} tokens · base vs tuned model`;
    appendSaved(d.tuned);
    showDiff(d, -1);
    $("tokens").dataset.explained = `-1:${d.tuned.method}:diff`;
  }

  function showFileExplanation(e) {
    $("status").textContent = `saved explanation · ${e.tokens.length} tokens`;
    appendSaved(e);
    showExplanation({ selected: -1, relevance: e.relevance, evicted: e.evicted, target: e.target,
                      method: e.method, score: e.target_logit, label: e.score_label || "logit",
                      layers: e.layers });
  }

  function showFileGeneration(g) {
    const n = g.generated_tokens.length;
    $("status").textContent =
      `saved generation · ${g.prompt_tokens.length} prompt tokens, ${n} generated; click a generated token`;
    appendTokens(g.prompt_tokens, g.prompt_ids, false);
    appendTokens(g.generated_tokens, g.generated_ids, true);
    state.nPrompt = g.prompt_tokens.length;
    state.file = g;
    if (n) showGenerationRow(n - 1); // as the static HTML rendering: the last token first
  }

  // Row g of the matrix: the relevance of every earlier token for generated token g.
  function showGenerationRow(g) {
    const row = H.generationRow(state.file, g);
    showExplanation({
      selected: row.index,
      relevance: row.values,
      evicted: row.evicted,
      target: row.target,
      method: state.file.method,
      score: row.score,
      label: "logit", // each generated token's own logit
      layers: null,
    });
    $("tokens").dataset.explained = `${row.index}:${state.file.method}`;
  }

  // -------------------------------------------------------------------------------- server API
  const KEY_STORAGE = "lucidlm.apiKey";

  function apiKey() {
    return $("api-key").value.trim();
  }

  function requestHeaders(json) {
    const headers = {};
    if (json) headers["Content-Type"] = "application/json";
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    return headers;
  }

  // The server's error message: {"error": {"message"}} (OpenAI style) or FastAPI's {"detail"}.
  async function errorMessage(resp) {
    const text = await resp.text().catch(() => "");
    try {
      const data = JSON.parse(text);
      if (data && data.error) return data.error.message || JSON.stringify(data.error);
      if (data && data.detail) return typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    } catch (_) {
      // not JSON: fall through to the raw text
    }
    return `HTTP ${resp.status} ${resp.statusText}` + (text ? `: ${text.slice(0, 300)}` : "");
  }

  // GET (body undefined) or POST JSON; resolves to the response, throws with the server's message.
  async function call(path, body, signal) {
    const post = body !== undefined;
    const resp = await fetch(path, {
      method: post ? "POST" : "GET",
      headers: requestHeaders(post),
      body: post ? JSON.stringify(body) : undefined,
      signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    return resp;
  }

  // Server-sent events of a POST response (EventSource cannot POST): yields each event's data.
  async function* sseData(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const take = (block) => block.split("\n").filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const data = take(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (data) yield data;
      }
    }
    const rest = take(buffer);
    if (rest) yield rest;
  }

  async function ensureModel() {
    if (state.model) return state.model;
    const resp = await call("v1/models");
    const list = await resp.json();
    if (!list.data || !list.data.length) throw new Error("the server lists no model");
    state.model = list.data[0].id;
    showServerStatus();
    return state.model;
  }

  async function loadHealth() {
    try {
      const resp = await call("health");
      state.health = await resp.json();
    } catch (err) {
      showError(`Server health check failed: ${err.message}`);
      return;
    }
    const { kv_cache: policy, cache_tokens: slots } = state.health;
    $("kv-label").hidden = !policy;
    $("diff-label").hidden = !state.health.diff;
    if (policy) {
      $("kv-text").textContent = `explain through the server's KV cache (${policy}, ${slots} tokens)`;
    }
    showServerStatus();
  }

  function showServerStatus() {
    const h = state.health || {};
    const parts = [state.model || h.model || "no model yet"];
    if (h.diff) parts.push("diff against its base model available");
    if (h.context_length) parts.push(`context ${h.context_length} tokens`);
    if (h.kv_cache) parts.push(`KV cache ${h.kv_cache} (${h.cache_tokens} tokens)`);
    if (h.auth && !apiKey()) parts.push("this server needs an API key");
    $("status").textContent = parts.join(" · ");
  }

  // -------------------------------------------------------------------------------- generation
  function chatMode() {
    return document.querySelector('input[name="mode"]:checked').value === "chat";
  }

  function addBubble(role, text) {
    const bubble = document.createElement("div");
    bubble.className = `bubble ${role}`;
    bubble.textContent = text;
    $("chat-log").appendChild(bubble);
    return bubble;
  }

  function setGenerating(controller) {
    state.generation = controller;
    $("generate").textContent = controller ? "Stop" : chatMode() ? "Send" : "Generate";
    setPhase(controller ? "generating" : "idle");
  }

  // Adds a stream chunk's tokens to the view; returns its text delta.
  function takeChunk(chunk, chat) {
    if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return "";
    if (choice.prompt_token_ids) {
      const ids = choice.prompt_token_ids;
      appendTokens(choice.prompt_tokens || ids.map(String), ids, false);
      state.ids.push(...ids);
      state.nPrompt = ids.length;
    }
    if (choice.token_ids && choice.token_ids.length) {
      appendTokens(choice.tokens || choice.token_ids.map(String), choice.token_ids, true);
      state.ids.push(...choice.token_ids);
    }
    return (chat ? choice.delta && choice.delta.content : choice.text) || "";
  }

  async function generate() {
    if (state.generation) {
      state.generation.abort(); // the button doubles as Stop while streaming
      return;
    }
    clearError();
    const text = $("prompt").value;
    if (!text) {
      showError(chatMode() ? "Type a message first." : "Type a prompt first.");
      return;
    }
    const chat = chatMode();
    const controller = new AbortController();
    setGenerating(controller);
    let bubble = null;
    let reply = "";
    try {
      const model = await ensureModel();
      const body = {
        model,
        max_tokens: Number($("max-tokens").value) || 16,
        temperature: Number($("temperature").value) || 0,
        stream: true,
        return_token_ids: true,
      };
      if (chat) {
        state.chat.push({ role: "user", content: text });
        addBubble("user", text);
        bubble = addBubble("assistant", "");
        bubble.classList.add("pending");
        body.messages = state.chat.slice();
        $("prompt").value = "";
      } else {
        body.prompt = text;
      }
      clearTokens();
      const resp = await call(chat ? "v1/chat/completions" : "v1/completions", body, controller.signal);
      for await (const data of sseData(resp)) {
        if (data === "[DONE]") break;
        reply += takeChunk(JSON.parse(data), chat);
        if (bubble) bubble.textContent = reply;
      }
    } catch (err) {
      if (err.name !== "AbortError") {
        showError(err.message);
        if (bubble && !reply) {
          undoTurn(text, bubble); // nothing came back: let the user resend
          bubble = null;
        }
      }
    } finally {
      if (bubble) finishTurn(bubble, reply);
      setGenerating(null);
    }
  }

  // Keeps the assistant's reply (or what streamed before Stop) in the conversation.
  function finishTurn(bubble, reply) {
    bubble.classList.remove("pending");
    if (!reply) bubble.textContent = "(empty reply)";
    state.chat.push({ role: "assistant", content: reply });
  }

  // A failed send: drop the user turn again and give its text back to the input.
  function undoTurn(text, bubble) {
    state.chat.pop();
    bubble.previousElementSibling.remove();
    bubble.remove();
    $("prompt").value = text;
  }

  function newChat() {
    state.chat = [];
    $("chat-log").replaceChildren();
    clearTokens();
  }

  function onModeChange() {
    const chat = chatMode();
    $("chat-log").hidden = !chat;
    $("clear-chat").hidden = !chat;
    $("prompt").placeholder = chat ? "Message" : "Text to continue";
    if (!state.generation) $("generate").textContent = chat ? "Send" : "Generate";
  }

  // -------------------------------------------------------------------------------- explain
  function useKvCache() {
    return Boolean(state.health && state.health.kv_cache && $("kv-cache").checked);
  }

  // Diff mode: the server has a base model and the box is ticked (a diff runs without a KV policy).
  function useDiff() {
    return Boolean(state.health && state.health.diff && $("diff").checked);
  }

  // A contrast typed as digits is a token id, anything else a token text.
  function contrastValue() {
    const text = $("contrast").value;
    if (!text.trim()) return undefined;
    return /^\s*\d+\s*$/.test(text) ? Number(text) : text;
  }

  async function explainToken(index) {
    const seq = ++state.explainSeq;
    const method = $("method").value;
    const body = { model: state.model, input_ids: state.ids.slice(0, index), target: state.ids[index], method };
    const contrast = contrastValue();
    if (contrast !== undefined) body.contrast = contrast;
    const diff = useDiff();
    if (diff) {
      body.diff = true;
    } else if (useKvCache()) {
      body.kv_cache = state.health.kv_cache;
      if (state.health.cache_tokens != null) body.cache_tokens = state.health.cache_tokens;
    } else {
      body.layers = true; // latent relevances exist only without a KV policy
    }
    clearError();
    $("tokens").removeAttribute("data-explained");
    state.spans.forEach((span, j) => span.classList.toggle("selected", j === index));
    state.selected = index;
    setPhase("explaining");
    try {
      const resp = await call("v1/explain", body);
      const ex = await resp.json(); // the wire format, and the server's "object" and "model"
      if (seq !== state.explainSeq) return; // a newer click owns the view
      if (ex.type === "ExplanationDiff") {
        showDiff(ex, index);
      } else {
        showExplanation({ selected: index, relevance: ex.relevance, evicted: ex.evicted, target: ex.target,
                          method: ex.method || method, score: ex.target_logit,
                          label: ex.score_label || "logit", layers: ex.layers });
      }
      $("tokens").dataset.explained = `${index}:${method}` + (diff ? ":diff" : "");
    } catch (err) {
      if (seq === state.explainSeq) showError(`Explain failed: ${err.message}`);
    } finally {
      if (seq === state.explainSeq) setPhase(state.generation ? "generating" : "idle");
    }
  }

  function reexplain() {
    if (!state.fileMode && state.selected >= state.nPrompt && state.selected < state.ids.length) {
      explainToken(state.selected);
    }
  }

  function onTokenClick(event) {
    const span = event.target.closest(".tok.gen");
    if (!span) return;
    const index = Number(span.dataset.index);
    if (state.fileMode) {
      if (state.file) showGenerationRow(index - state.nPrompt);
    } else {
      explainToken(index);
    }
  }

  // -------------------------------------------------------------------------------- start
  function startServerMode() {
    $("generate-panel").hidden = false;
    $("explain-panel").hidden = false;
    setPhase("idle");
    const key = $("api-key");
    key.value = sessionStorage.getItem(KEY_STORAGE) || "";
    key.addEventListener("change", () => {
      sessionStorage.setItem(KEY_STORAGE, key.value.trim());
      showServerStatus();
      if (!state.model) ensureModel().then(clearError, (err) => showError(`Listing models failed: ${err.message}`));
    });
    document.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", onModeChange));
    $("generate").addEventListener("click", generate);
    $("clear-chat").addEventListener("click", newChat);
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
    });
    $("method").addEventListener("change", reexplain);
    $("contrast").addEventListener("change", reexplain);
    $("kv-cache").addEventListener("change", reexplain);
    $("diff").addEventListener("change", reexplain);
    onModeChange();
    loadHealth();
    ensureModel().catch((err) => showError(`Listing models failed: ${err.message}` +
      (/auth|key|401/i.test(err.message) ? " (enter the API key above)" : "")));
  }

  function start() {
    $("tokens").addEventListener("click", onTokenClick);
    const embedded = $("lucidlm-data");
    if (!embedded) {
      startServerMode();
      return;
    }
    let data;
    try {
      data = JSON.parse(embedded.textContent);
    } catch (err) {
      showError(`The embedded explanation is not valid JSON: ${err.message}`);
      return;
    }
    startFileMode(data);
  }

  start();
})();

// The edgellm chat page: talks to this server's own /v1/chat/completions with stream: true.
// Conversations and settings live in localStorage, the API key (if the server wants one) in sessionStorage.
// Model text only ever reaches the page as text nodes (markdown.js): nothing here parses a string as HTML.
import { renderMarkdown } from "./markdown.js";

const KEYS = { conversations: "edgellm.conversations", current: "edgellm.current", settings: "edgellm.settings",
  apiKey: "edgellm.apiKey" };
const DEFAULT_SETTINGS = { system: "", temperature: "", top_p: "", max_tokens: "" };
const $ = (id) => document.getElementById(id);

const state = {
  conversations: [],  // [{id, title, created, messages: [{role, content, stats?, stopped?, error?}]}], newest first
  currentId: null,
  settings: { ...DEFAULT_SETTINGS },
  model: null,
  controller: null,  // AbortController of the reply being streamed
  keyPrompt: null,  // Promise<boolean> while the API key dialog is open
};

// ---- storage -------------------------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function save() {
  try {
    localStorage.setItem(KEYS.conversations, JSON.stringify(state.conversations.filter((c) => c.messages.length)));
    localStorage.setItem(KEYS.current, JSON.stringify(state.currentId));
    $("storage-warning").hidden = true;
  } catch {
    $("storage-warning").hidden = false;  // quota exceeded or storage disabled: the chat goes on, unsaved
  }
}

function current() {
  return state.conversations.find((c) => c.id === state.currentId);
}

function newConversation() {
  const empty = state.conversations.find((c) => !c.messages.length);
  const conv = empty || { id: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`,
    title: "", created: Date.now(), messages: [] };
  if (!empty) state.conversations.unshift(conv);
  state.currentId = conv.id;
  save();
  renderAll();
  $("prompt").focus();
}

// ---- rendering -----------------------------------------------------------------------------------------------

function renderAll() {
  renderList();
  renderMessages();
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    if (!conv.messages.length) continue;
    const li = document.createElement("li");
    li.className = conv.id === state.currentId ? "active" : "";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conv-title";
    open.textContent = conv.title || "Untitled";
    open.title = conv.title;
    open.addEventListener("click", () => {
      if (state.controller) return;
      state.currentId = conv.id;
      save();
      renderAll();
      document.body.classList.remove("sidebar-open");
    });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "conv-delete";
    del.setAttribute("aria-label", `Delete conversation ${conv.title}`);
    del.textContent = "×";
    del.addEventListener("click", () => {
      if (state.controller && conv.id === state.currentId) return;
      state.conversations = state.conversations.filter((c) => c !== conv);
      if (conv.id === state.currentId) state.currentId = null;
      save();
      if (!current()) newConversation();
      else renderAll();
    });
    li.append(open, del);
    list.append(li);
  }
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const conv = current();
  if (!conv || !conv.messages.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = state.model ? `Ask ${state.model} anything. It runs on this server.` : "Ask anything.";
    box.append(empty);
    return;
  }
  for (const msg of conv.messages) box.append(messageNode(msg));
  box.scrollTop = box.scrollHeight;
}

function messageNode(msg) {
  const node = document.createElement("div");
  node.className = `msg ${msg.role}`;
  const body = document.createElement("div");
  body.className = "body";
  node.append(body);
  fillMessage(node, msg);
  return node;
}

function fillMessage(node, msg) {
  const body = node.querySelector(".body");
  if (msg.role === "user") {
    body.textContent = msg.content;
  } else {
    body.replaceChildren(renderMarkdown(msg.content));
    if (msg.pending) {
      const cursor = document.createElement("span");
      cursor.className = "cursor";
      (body.lastElementChild && !body.lastElementChild.matches(".code-block, ul, ol, table, .table-wrap")
        ? body.lastElementChild : body).append(cursor);
    }
  }
  node.querySelector(".meta")?.remove();
  const parts = [];
  if (msg.stats) {
    const s = msg.stats;
    parts.push(`${s.tokens} tokens`);
    if (s.tokensPerSecond) parts.push(`${s.tokensPerSecond.toFixed(1)} tokens/s`);
    if (s.ttft !== undefined) parts.push(`first token ${s.ttft.toFixed(2)} s`);
  }
  if (msg.finish === "length") parts.push("cut at max_tokens");
  if (msg.stopped) parts.push("stopped");
  if (parts.length || msg.error) {
    const meta = document.createElement("div");
    meta.className = "meta";
    if (msg.stats?.tokensPerSecond) meta.dataset.tokensPerSecond = msg.stats.tokensPerSecond.toFixed(1);
    meta.textContent = parts.join(" · ");
    if (msg.error) {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = msg.error;
      meta.append(err);
    }
    node.append(meta);
  }
}

// ---- API -----------------------------------------------------------------------------------------------------

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return body?.error?.message || `HTTP ${resp.status}`;
  } catch {
    return `HTTP ${resp.status} ${resp.statusText}`;
  }
}

/** Ask for the API key in a dialog; resolves true when one was entered. */
function askForKey(message) {
  const dialog = $("key-dialog");
  $("key-error").textContent = message || "";
  $("key-error").hidden = !message;
  $("key-input").value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = $("key-input").value.trim();
      if (dialog.returnValue === "ok" && key) {
        sessionStorage.setItem(KEYS.apiKey, key);
        resolve(true);
      } else {
        resolve(false);
      }
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    $("key-input").focus();
  });
}

/** fetch() that asks for the API key (again) while the server answers 401. */
async function apiFetch(path, init = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEYS.apiKey);
    const headers = { ...(init.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    const resp = await fetch(path, { ...init, headers });
    if (resp.status !== 401) return resp;
    if (state.keyPrompt) {  // another request is asking already: use its answer
      if (!(await state.keyPrompt)) return resp;
      continue;
    }
    if (sessionStorage.getItem(KEYS.apiKey) !== key) continue;  // a new key was entered meanwhile
    sessionStorage.removeItem(KEYS.apiKey);
    state.keyPrompt = askForKey(key ? "The server refused that key." : "");
    const entered = await state.keyPrompt;
    state.keyPrompt = null;
    if (!entered) return resp;
  }
}

async function loadModel() {
  try {
    const resp = await apiFetch("v1/models");
    if (!resp.ok) return;
    state.model = (await resp.json()).data?.[0]?.id || null;
    $("model-name").textContent = state.model || "";
    document.title = state.model ? `${state.model} · edgellm` : "edgellm";
    if (!current()?.messages.length) renderMessages();
  } catch {
    // the server is unreachable: sending will show the error
  }
}

function requestBody(conv) {
  const s = state.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conv.messages) {
    if (m.pending) continue;
    if (m.role === "assistant" && !m.content) {  // failed or stopped before any text: drop the turn
      if (messages.at(-1)?.role === "user") messages.pop();
      continue;
    }
    messages.push({ role: m.role, content: m.content });
  }
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  for (const name of ["temperature", "top_p", "max_tokens"]) {
    if (String(s[name]).trim() !== "") body[name] = Number(s[name]);
  }
  return body;
}

async function send() {
  const input = $("prompt");
  const text = input.value.trim();
  if (!text || state.controller) return;
  const conv = current();
  conv.messages.push({ role: "user", content: text });
  if (!conv.title) conv.title = text.length > 48 ? `${text.slice(0, 47)}…` : text;
  input.value = "";
  autosize();
  const reply = { role: "assistant", content: "", pending: true };
  const body = requestBody(conv);
  conv.messages.push(reply);
  state.conversations = [conv, ...state.conversations.filter((c) => c !== conv)];
  save();
  renderAll();
  await stream(body, reply, $("messages").lastElementChild);
}

async function stream(body, reply, node) {
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let firstAt = null;
  let savedAt = 0;
  const update = () => {
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    fillMessage(node, reply);
    if (atBottom) box.scrollTop = box.scrollHeight;
    if (performance.now() - savedAt > 1000) {
      savedAt = performance.now();
      save();
    }
  };
  const onEvent = (data) => {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) {
      reply.error = chunk.error.message;
      return;
    }
    const choice = chunk.choices?.[0];
    if (choice?.delta?.content) {
      firstAt ??= performance.now();
      reply.content += choice.delta.content;
    }
    if (choice?.finish_reason) reply.finish = choice.finish_reason;
    if (chunk.usage) {
      const u = chunk.usage;
      const end = performance.now();
      // The server's own decode speed when it reports one; else measured here, from the first to the last token.
      const measured = u.completion_tokens > 1 && firstAt !== null && end > firstAt
        ? (u.completion_tokens - 1) / ((end - firstAt) / 1000) : null;
      reply.stats = { tokens: u.completion_tokens, tokensPerSecond: u.extra?.decode_tokens_per_s ?? measured,
        ttft: u.extra?.ttft_s ?? (firstAt !== null ? (firstAt - started) / 1000 : undefined) };
    }
  };
  try {
    const resp = await apiFetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) {
      reply.error = await errorMessage(resp);
    } else {
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (line.startsWith("data:")) onEvent(line.slice(5).trim());
          }
        }
        update();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = `Connection failed: ${e.message}`;
  } finally {
    delete reply.pending;
    state.controller = null;
    setBusy(false);
    save();
    fillMessage(node, reply);
    $("prompt").focus();
  }
}

function stop() {
  state.controller?.abort();  // closes the connection; the server cancels the request when its client is gone
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// ---- settings ------------------------------------------------------------------------------------------------

function openSettings() {
  const s = state.settings;
  $("set-system").value = s.system;
  $("set-temperature").value = s.temperature;
  $("set-top-p").value = s.top_p;
  $("set-max-tokens").value = s.max_tokens;
  $("settings").showModal();
}

function saveSettings() {
  state.settings = {
    system: $("set-system").value,
    temperature: $("set-temperature").value,
    top_p: $("set-top-p").value,
    max_tokens: $("set-max-tokens").value,
  };
  localStorage.setItem(KEYS.settings, JSON.stringify(state.settings));
}

// ---- wiring --------------------------------------------------------------------------------------------------

function autosize() {
  const input = $("prompt");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight + 2, 200)}px`;  // + the 1px borders
  input.style.overflowY = input.scrollHeight + 2 > 200 ? "auto" : "hidden";
}

function init() {
  state.settings = { ...DEFAULT_SETTINGS, ...load(KEYS.settings, {}) };
  state.conversations = load(KEYS.conversations, []).filter((c) => c && Array.isArray(c.messages));
  for (const conv of state.conversations) {
    for (const m of conv.messages) {
      if (m.pending) {  // the page was closed while this reply streamed
        delete m.pending;
        m.stopped = true;
      }
    }
  }
  state.currentId = load(KEYS.current, null);
  if (!current()) newConversation();
  else renderAll();

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("prompt").addEventListener("input", autosize);
  autosize();
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    if (!state.controller) newConversation();
    document.body.classList.remove("sidebar-open");
  });
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  $("scrim").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") document.body.classList.remove("sidebar-open");
  });
  $("open-settings").addEventListener("click", openSettings);
  $("settings-form").addEventListener("submit", saveSettings);  // method=dialog: the dialog closes itself
  $("settings-cancel").addEventListener("click", () => $("settings").close("cancel"));
  $("settings-reset").addEventListener("click", () => {
    $("set-system").value = "";
    $("set-temperature").value = "";
    $("set-top-p").value = "";
    $("set-max-tokens").value = "";
  });
  $("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));
  window.addEventListener("storage", (e) => {  // another tab changed the conversations
    if (e.key === KEYS.conversations && !state.controller) {
      state.conversations = load(KEYS.conversations, []);
      if (!current()) newConversation();
      else renderAll();
    }
  });
  loadModel();
}

// For tests and the curious: the renderer used for replies.
window.edgellm = { renderMarkdown };
init();

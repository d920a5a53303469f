// The page of `perceiver serve`: fills a text through POST /v1/fill and shows it as the
// terminal does (render.py): each fill's characters coloured by the model's confidence in
// the bands the server sends (the same table the terminal uses), candidates and per-byte
// alternatives on click. Plain JS, no build step, no network beyond this server.
"use strict";

const config = JSON.parse(document.getElementById("perceiver-config").textContent);
const KEY = "perceiver-api-key"; // sessionStorage: this tab only, never in a URL
const $ = (id) => document.getElementById(id);
const utf8 = new TextDecoder("utf-8"); // replaces what is not UTF-8, as errors="replace"
const strict = new TextDecoder("utf-8", { fatal: true });
const bidi = new Set(config.bidi);

// -- talking to the server ------------------------------------------------------------------

async function call(method, path, body) {
  for (;;) {
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = "Bearer " + key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await response.text();
    let answer = null;
    try { answer = JSON.parse(text); } catch (e) { answer = null; }
    if (response.status === 401) {
      sessionStorage.removeItem(KEY);
      const why = answer && answer.error ? answer.error : "this server needs an API key";
      if (!(await askKey(why))) throw new ServerError(401, why);
      continue;
    }
    if (!response.ok) {
      const message = answer && typeof answer.error === "string" ? answer.error : `${response.status} ${response.statusText}: ${text.slice(0, 200)}`;
      throw new ServerError(response.status, message);
    }
    return answer;
  }
}

class ServerError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function askKey(why) {
  const dialog = $("key-dialog");
  $("key-why").textContent = why + ". The key is kept for this tab only.";
  $("key").value = "";
  return new Promise((resolve) => {
    const done = (ok) => {
      $("key-form").onsubmit = null;
      dialog.oncancel = null;
      dialog.close();
      resolve(ok);
    };
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY, key);
      done(true);
    };
    dialog.oncancel = () => done(false);
    dialog.showModal();
    $("key").focus();
  });
}

// -- the model, in the header ---------------------------------------------------------------

async function showModel() {
  try {
    const info = await call("GET", "/info");
    const quantized = (info.mixed ? " mixed" : "") + (info.quantize && info.quantize !== "none" ? ", " + info.quantize : "");
    $("model").textContent = `model: ${info.model} (${info.device}, ${info.dtype}${quantized})`;
  } catch (e) {
    $("model").textContent = "model: unknown (" + e.message + ")";
  }
}

// -- bytes and characters, as render.py cuts them -------------------------------------------

function fromBase64(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

// (text, first byte, end byte) per character; a byte that is not UTF-8 is U+FFFD (render.utf8_chars)
function utf8Chars(data) {
  const out = [];
  let i = 0;
  while (i < data.length) {
    const b = data[i];
    const n = b < 0x80 ? 1 : b >= 0xc2 && b <= 0xdf ? 2 : b >= 0xe0 && b <= 0xef ? 3 : b >= 0xf0 && b <= 0xf4 ? 4 : 0;
    if (n > 1 && i + n <= data.length) {
      try {
        out.push([strict.decode(data.subarray(i, i + n)), i, i + n]);
        i += n;
        continue;
      } catch (e) { /* one byte, replaced */ }
    }
    out.push([b < 0x80 ? String.fromCharCode(b) : "\ufffd", i, i + 1]);
    i += 1;
  }
  return out;
}

// a filled character as the terminal shows it (render._visible): controls as their pictures
function visible(ch) {
  const o = ch.codePointAt(0);
  if (ch === "\n" || ch === "\t") return ch;
  if (o < 32) return String.fromCodePoint(0x2400 + o);
  if (o === 127) return "\u2421";
  if ((o >= 0x80 && o < 0xa0) || bidi.has(o)) return "\ufffd";
  return ch;
}

function band(p) {
  for (const b of config.bands) if (p >= b.min) return b;
  return config.bands[config.bands.length - 1];
}

function percent(p) {
  return p >= 0.0005 ? (100 * p).toFixed(1) + "%" : "<0.1%";
}

function showFill(s) { // a fill quoted, spaces visible, controls escaped (render.show_fill)
  return JSON.stringify(s).replace(/[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g,
    (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

function showByte(b) { // render.show_byte
  if (b === 39) return `"'"`;
  if (b === 92) return "'\\\\'";
  if (b >= 32 && b < 127) return `'${String.fromCharCode(b)}'`;
  return { 9: "'\\t'", 10: "'\\n'", 13: "'\\r'" }[b] || "\\x" + b.toString(16).padStart(2, "0");
}

// -- filling --------------------------------------------------------------------------------

let answer = null; // the last result (the exact wire format: results.result_to_wire)
let topK = 1;

function options() {
  const choices = $("choices").value.split("\n").map((w) => w.replace(/\r$/, "")).filter((w) => w.length > 0);
  const k = Number($("top-k").value);
  const o = { top_k: Number.isInteger(k) ? k : $("top-k").value, explain: true };
  if (choices.length) o.choices = choices; // each choice is scored as written: no strategy applies
  else o.strategy = $("strategy").value;
  return o;
}

async function fill() {
  const button = $("fill");
  if (button.disabled) return;
  button.disabled = true;
  $("busy").textContent = "filling…";
  $("error").hidden = true;
  const o = options();
  try {
    const result = await call("POST", "/v1/fill", { text: $("text").value, options: o, detail: true });
    topK = o.top_k;
    show(result);
    $("busy").textContent = "";
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
    $("busy").textContent = "";
  } finally {
    button.disabled = false;
    const form = $("fill-form"); // how many fills have finished, for whoever waits on one
    form.dataset.done = String(Number(form.dataset.done || 0) + 1);
  }
}

function show(result) {
  answer = result;
  const out = $("result");
  out.replaceChildren();
  $("details").hidden = true;
  const frag = document.createDocumentFragment();
  const pieces = result.pieces.length ? result.pieces : [result.data];
  let chars = 0;
  let shown = 0;
  const addText = (text) => {
    const room = config.max_chars - chars;
    const part = text.length > room ? text.slice(0, Math.max(room, 0)) : text;
    if (part) frag.appendChild(document.createTextNode(part));
    chars += part.length;
    return part.length === text.length;
  };
  let whole = addText(utf8.decode(fromBase64(pieces[0])));
  for (let k = 0; whole && k < result.spans.length; k++) {
    if (shown >= config.max_spans || chars >= config.max_chars) { whole = false; break; }
    frag.appendChild(spanElement(result.spans[k], k));
    shown++;
    whole = addText(utf8.decode(fromBase64(pieces[k + 1] || "")));
  }
  out.appendChild(frag);
  const cut = $("cut");
  if (whole) {
    cut.hidden = true;
  } else {
    cut.textContent = `Showing the first ${shown} of ${result.spans.length} fills and ${chars.toLocaleString("en")} characters; ` +
      "the rest was cut to keep this page responsive (the API returns it all).";
    cut.hidden = false;
  }
  $("result-section").hidden = false;
}

function spanElement(span, k) {
  const data = fromBase64(span.data);
  const el = document.createElement("span");
  el.className = "fill";
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  el.dataset.span = String(k);
  const fillText = utf8.decode(data);
  const p = Math.exp(span.logprob);
  el.setAttribute("aria-label", `fill ${k + 1}: ${showFill(fillText)}, ${percent(p)}; show candidates`);
  let run = "";
  let current = null;
  const flush = () => {
    if (!run) return;
    const part = document.createElement("span");
    part.className = "band-" + current.colour;
    part.textContent = run;
    el.appendChild(part);
    run = "";
  };
  for (const [ch, a, b] of utf8Chars(data)) {
    let sum = 0;
    for (let i = a; i < b; i++) sum += span.byte_logprobs[i];
    const c = band(Math.exp(sum));
    if (current && c !== current) flush();
    current = c;
    run += visible(ch);
  }
  flush();
  return el;
}

function details(k) {
  const span = answer.spans[k];
  $("details-title").textContent = `Fill ${k + 1} (at character ${span.start}, ${span.length} bytes)`;
  // as render.candidates: a choice's candidates also show the score that ranked them, apart
  const candidates = span.from_choices ? span.candidates : span.candidates.slice(0, Math.max(topK, 1));
  const rule = (candidates.find((c) => c.length > 2) || [])[3];
  const head = ["#", "fill", ...(rule ? [`score (${rule})`] : []), "P(fill)", "logprob"];
  $("candidates").tHead.replaceChildren(row(head, "th"));
  const rows = candidates.map(([data, logprob, score], rank) => {
    const p = Math.exp(logprob);
    const scored = rule ? [score === undefined ? "" : score.toFixed(3)] : [];
    return row([String(rank + 1), showFill(utf8.decode(fromBase64(data))), ...scored, [percent(p), band(p)], logprob.toFixed(3)]);
  });
  $("candidates").tBodies[0].replaceChildren(...rows);
  // as render.explain: the byte filled there (a search or a choice may fill another than the
  // model's best) and the most probable other bytes at that position
  const data = fromBase64(span.data);
  const bytes = span.alternatives.map((alts, i) => {
    const filled = data[i];
    const lp = span.byte_logprobs[i];
    const rest = alts.filter(([b]) => b !== filled).slice(0, Math.max(alts.length - 1, 0))
      .map(([b, l]) => `${showByte(b)} ${percent(Math.exp(l))}`).join("   ");
    return row([String(i + 1), [`${showByte(filled)} ${percent(Math.exp(lp))}`, band(Math.exp(lp))], rest]);
  });
  $("bytes").tBodies[0].replaceChildren(...bytes);
  $("details").hidden = false;
  for (const el of document.querySelectorAll(".fill[aria-pressed]")) el.removeAttribute("aria-pressed");
  const chosen = document.querySelector(`.fill[data-span="${k}"]`);
  if (chosen) chosen.setAttribute("aria-pressed", "true");
}

function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement(tag);
    if (tag === "th") td.scope = "col";
    if (Array.isArray(cell)) {
      td.textContent = cell[0];
      td.className = "band-" + cell[1].colour;
    } else {
      td.textContent = cell;
    }
    tr.appendChild(td);
  }
  return tr;
}

// -- wiring ---------------------------------------------------------------------------------

function setup() {
  for (const name of config.strategies) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    option.selected = name === config.default_strategy;
    $("strategy").appendChild(option);
  }
  $("top-k").max = String(config.max_top_k);
  $("top-k").value = String(config.default_top_k);
  const legend = $("legend");
  legend.appendChild(document.createTextNode("fill confidence: "));
  for (const b of config.bands) {
    const item = document.createElement("span");
    item.className = "band-" + b.colour;
    item.textContent = "\u25a0 " + b.label;
    legend.appendChild(item);
    legend.appendChild(document.createTextNode(" "));
  }
  $("fill-form").addEventListener("submit", (event) => { event.preventDefault(); fill(); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("key-dialog").open) {
      event.preventDefault();
      fill();
    }
  });
  const result = $("result");
  const open = (event) => {
    const el = event.target.closest(".fill");
    if (el) details(Number(el.dataset.span));
  };
  result.addEventListener("click", open);
  result.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); open(event); }
  });
  showModel();
}

setup();

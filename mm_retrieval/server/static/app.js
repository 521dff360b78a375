// The search page of `mmr serve`: vanilla JS over the server's JSON API, no build step.
// POST search (by words, image bytes or an item id), GET thumb/ID and image/ID, POST explain;
// a video hit (a moment: `video`, `start`, `end`) plays from GET video/ID (HTTP range requests).
"use strict";

const $ = (id) => document.getElementById(id);

// Same ramp as mm_retrieval/explain.py (inferno-like): low attention dark, high attention bright.
const RAMP = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]];

const state = {
  info: null,          // GET collection
  key: sessionStorage.getItem("mmr-api-key") || "",
  imageQuery: null,    // {image: base64, name, preview} or {image_id, name, preview}
  request: null,       // the last search body sent (without paging)
  page: 1,
  seq: 0,              // newest search wins when answers arrive out of order
  detail: null,        // {hit, query, explanation, word, head, image}
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ---- talking to the server ---------------------------------------------------------------
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["X-API-Key"] = state.key;
  let res;
  try {
    res = await fetch(path, Object.assign({}, options, { headers }));
  } catch (e) {
    throw new ApiError(0, `Cannot reach the server (${e.message}). Is mmr serve still running?`);
  }
  if (!res.ok) {
    let message = res.statusText || "request failed";
    try { message = errorText(await res.json()) || message; } catch (_) { /* not JSON */ }
    if (res.status === 401) $("key-box").hidden = false;
    throw new ApiError(res.status, message);
  }
  return res;
}

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

// Every wire format's error body: native {detail}, Cohere {message}, vLLM {error: {message}}, TEI {error}.
function errorText(body) {
  if (!body) return "";
  if (typeof body.detail === "string") return body.detail;
  if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  if (typeof body.message === "string") return body.message;
  if (body.error && typeof body.error.message === "string") return body.error.message;
  if (typeof body.error === "string") return body.error;
  return JSON.stringify(body);
}

const STATUS_TITLES = { 400: "The server could not use this request", 401: "API key needed", 403: "Not allowed",
  404: "Not found", 413: "Too large", 422: "Invalid request", 429: "The server is busy", 503: "The server is not ready" };

function showError(e) {
  const box = $("error");
  box.textContent = "";
  const title = document.createElement("strong");
  const status = e instanceof ApiError ? e.status : 0;
  title.textContent = status ? `${STATUS_TITLES[status] || "Request failed"} (HTTP ${status})` : "Error";
  box.append(title, document.createTextNode(e.message || String(e)));
  box.hidden = false;
}

function clearError() { $("error").hidden = true; }

// Images need the API key when one is set, which an <img src> can't send: fetch them instead.
async function setImage(img, url) {
  if (!state.key) { img.src = url; return; }
  const blob = await (await api(url)).blob();
  img.src = URL.createObjectURL(blob);
}

// ---- start-up ----------------------------------------------------------------------------
async function loadInfo() {
  try {
    state.info = await (await api("collection")).json();
  } catch (e) {
    $("collection-info").textContent = "not connected";
    showError(e);
    return false;
  }
  const info = state.info;
  $("collection-info").textContent =
    `collection “${info.collection}” · ${info.items.toLocaleString()} items · ${info.reranker ? "reranker " + info.model : "no reranker"}`;
  const rerank = $("rerank");
  if (!info.reranker) {
    rerank.checked = false;
    rerank.disabled = true;
    $("rerank-label").classList.add("off");
    $("rerank-label").title = "This server has no reranker";
    $("rerank-note").textContent = "No reranker loaded: start the server with mmr serve --rerank DIR to rerank. Scores are the first stage's.";
    $("rerank-note").hidden = false;
  }
  $("candidates").value = info.defaults.candidates;
  $("candidates").max = info.limits.max_k;
  $("mode-label").hidden = info.modes.length < 2;  // modes other than image need text vectors (ocr: text read in images)
  for (const opt of $("mode").options) opt.hidden = !info.modes.includes(opt.value);
  $("mode").value = info.defaults.mode;
  $("group-label").hidden = !info.videos;  // grouping matters only where videos are indexed
  $("query").maxLength = info.limits.max_query_chars;
  clearError();
  return true;
}

function intValue(el, fallback) {
  const n = parseInt(el.value, 10);
  if (!Number.isFinite(n) || n < 1) { el.value = fallback; return fallback; }
  return n;
}

// ---- searching ---------------------------------------------------------------------------
function buildRequest() {
  const body = {};
  const text = $("query").value.trim();
  if (text || !state.imageQuery) body.query = $("query").value;  // empty: the server says what's wrong
  else if (state.imageQuery.image_id) body.image_id = state.imageQuery.image_id;
  else body.image = state.imageQuery.image;
  body.k = intValue($("per-page"), 24);
  body.candidates = intValue($("candidates"), 100);
  // Ticked: the server's default, reranking where it applies (an explicit `rerank: true` is refused
  // for what the reranker can't score: image queries, text mode). Unticked: first stage only.
  if (!(state.info && state.info.reranker && $("rerank").checked)) body.rerank = false;
  if (!$("mode-label").hidden && $("mode").value !== "auto") body.mode = $("mode").value;
  if (!$("group-label").hidden && !$("group-by-video").checked) body.group_by_video = false;  // default: one per video
  if ($("collapse-duplicates").checked) body.collapse_duplicates = true;
  const filter = $("filter").value.trim();
  if (filter) body.filter = filter;
  const minScore = parseFloat($("min-score").value);
  if (Number.isFinite(minScore)) body.min_score = minScore;
  const sort = $("sort").value.trim();
  if (sort) body.sort = sort;
  return body;
}

async function search(page = 1) {
  if (!state.info && !(await loadInfo())) return;
  const body = buildRequest();
  if (body.query !== undefined && state.imageQuery) clearImageQuery(false);
  state.request = body;
  await runPage(page);
}

async function runPage(page) {
  const body = Object.assign({}, state.request, { offset: (page - 1) * state.request.k });
  const seq = ++state.seq;
  $("search-button").disabled = true;
  $("status").textContent = "Searching…";
  try {
    const doc = await (await postJSON("search", body)).json();
    if (seq !== state.seq) return;
    clearError();
    state.page = page;
    render(doc, body);
    saveHash(body, page);
  } catch (e) {
    if (seq !== state.seq) return;
    $("status").textContent = "";
    $("results").textContent = "";
    $("pager").hidden = true;
    showError(e);
  } finally {
    if (seq === state.seq) $("search-button").disabled = false;
  }
}

function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "–"; }

function basename(path) { return (path || "").split(/[\\/]/).pop() || "(no file)"; }

// A moment's span ("0:13–0:21") as the server words it (mm_retrieval.types.moment_text), so the
// page and `mmr search` never round it differently.
function momentText(hit) { return hit.moment || ""; }

function isMoment(hit) { return Boolean(hit.video) && typeof hit.start === "number" && typeof hit.end === "number"; }

function render(doc, body) {
  const grid = $("results");
  grid.textContent = "";
  const hits = doc.hits;
  const first = body.offset + 1;
  let how = "first stage only";
  if (doc.reranked) how = "reranked";
  else if (body.query === undefined && state.info.reranker) how += " (image queries are not reranked)";
  else if (state.info.reranker && body.rerank === false) how += " (rerank off)";
  const ms = doc.timings_ms && doc.timings_ms.total !== undefined ? ` · ${Math.round(doc.timings_ms.total)} ms` : "";
  const order = hits.length ? scoreColumns(doc, body.query === undefined)[0] : null;
  $("status").textContent = hits.length
    ? `Results ${first}–${first + hits.length - 1} · ${how} · mode ${doc.mode} · ordered by the ${order.name} (${order.meaning})${collapsedText(hits, body)}${ms}`
    : (body.offset ? "No more results." : `No results${body.filter ? " (the filter may exclude everything)" : ""}.`);
  grid.dataset.reranked = String(doc.reranked);
  for (const hit of hits) grid.append(card(hit, doc));
  renderPager(hits.length, body, doc.reranked);
}

// --mode ocr: the matched words' boxes over the thumbnail. The SVG's viewBox is the image's size
// (as displayed: EXIF orientation applied, like the thumbnail) and "meet" fits it as the image's
// object-fit: contain does, so the boxes land on the words at any thumbnail size.
function ocrBoxes(hit) {
  const ocr = hit.metadata && hit.metadata.ocr;
  if (!ocr || !Array.isArray(ocr.matches) || !ocr.matches.length || !Array.isArray(ocr.size)) return null;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "ocr-boxes");
  svg.setAttribute("viewBox", `0 0 ${ocr.size[0]} ${ocr.size[1]}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  for (const [word, x0, y0, x1, y1] of ocr.matches) {
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", x0); r.setAttribute("y", y0);
    r.setAttribute("width", Math.max(1, x1 - x0)); r.setAttribute("height", Math.max(1, y1 - y0));
    const t = document.createElementNS(ns, "title");
    t.textContent = `read: ${word}`;
    r.append(t);
    svg.append(r);
  }
  return svg;
}

function card(hit, doc) {
  const fig = document.createElement("figure");
  fig.className = "card";
  fig.tabIndex = 0;
  fig.dataset.id = hit.id;
  fig.dataset.rank = hit.rank;
  const box = document.createElement("div");
  box.className = "thumb";
  if (hit.has_image !== false) {
    const img = document.createElement("img");
    img.alt = basename(hit.path);
    img.loading = "lazy";
    setImage(img, `thumb/${hit.id}`).catch(() => { img.alt = "image unavailable"; });
    box.append(img);
    const words = ocrBoxes(hit);
    if (words) box.append(words);
    if (isMoment(hit)) {  // the representative frame, with where in the video the moment is
      fig.classList.add("moment");
      fig.dataset.video = hit.video.id;
      const badge = document.createElement("span");
      badge.className = "time-badge";
      badge.textContent = `▶ ${momentText(hit)}`;
      badge.title = `A moment of ${basename(hit.video.path)}: ${hit.start.toFixed(1)}–${hit.end.toFixed(1)} s (${(hit.end - hit.start).toFixed(1)} s)`;
      box.append(badge);
    }
  } else {
    box.textContent = hit.caption || "text-only item";
    box.classList.add("muted");
  }
  const cap = document.createElement("figcaption");
  const head = document.createElement("div");
  head.className = "head";
  head.innerHTML = `<span class="rank"></span><span class="name"></span>`;
  head.querySelector(".rank").textContent = `#${hit.rank}`;
  head.querySelector(".name").textContent = basename(hit.path);
  head.querySelector(".name").title = hit.path;
  const scores = document.createElement("div");
  scores.className = "scores";
  // The same columns, values and meanings as the detail panel (scoreColumns): the two never disagree.
  scoreColumns(doc, state.request && state.request.query === undefined).forEach((c, i) => {
    const p = pill(`${c.label} ${fmt(c.value(hit))}`, c.kind, `${c.name}: ${c.meaning}${i === 0 ? " (this list's order)" : ""}`);
    p.dataset.score = c.key;
    scores.append(p);
  });
  if (!doc.reranked) scores.append(pill("rerank –", "none", "Not reranked"));
  // lazy reranker tokens that could not be computed (e.g. the file is gone): first-stage score, listed last
  if (hit.not_reranked) scores.append(pill("not reranked", "none", `Not reranked: ${hit.not_reranked}; it keeps its first-stage score`));
  if (hit.near_duplicates) {
    scores.append(pill(`+${nearDuplicates(hit.near_duplicates)}`, "none",
      `Hidden: ${nearDuplicates(hit.near_duplicates)} of this photo (re-saved, resized, cropped or turned copies); untick "Hide near-duplicates" to see them`));
  }
  cap.append(head, scores);
  fig.append(box, cap);
  const open = () => openDetail(hit, doc);
  fig.addEventListener("click", open);
  fig.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
  return fig;
}

// The scores a hit shows, the one the list is ordered by first. Hybrid hits carry all of them:
// `score` (fused), `rerank_score`, `image_score`, `text_score`; image mode: `score` (the reranker's
// when reranked) and `retrieval_score` (the image-vector cosine); text mode: `score` (text cosine).
function scoreColumns(doc, byImage) {
  const query = byImage ? "query image" : "query";
  const image = { key: "image", label: "image", kind: "first", name: "image similarity",
    meaning: `cosine of the ${query} and the image vectors`, value: (h) => h.retrieval_score };
  const text = { key: "text", label: "text", kind: "text", name: "caption similarity",
    meaning: `cosine of the ${query} and the caption vectors`, value: (h) => h.text_score };
  const rerank = { key: "rerank", label: "rerank", kind: "rerank", name: "reranker score",
    meaning: "a logit, higher is better", value: (h) => (h.not_reranked ? null : h.score) };
  if (doc.mode === "hybrid") {
    const fused = { key: "fused", label: "fused", kind: "fused", name: "fused score",
      meaning: `fusion of the ${doc.reranked ? "reranker" : "image"} ranking and the caption ranking`, value: (h) => h.score };
    const cols = [fused];
    if (doc.reranked) cols.push({ ...rerank, value: (h) => h.rerank_score });
    return cols.concat([{ ...image, value: (h) => h.image_score }, text]);
  }
  if (doc.mode === "text") return [{ ...text, value: (h) => h.score }];
  if (doc.mode === "ocr") return [{ key: "words", label: "words", kind: "text", name: "words read in the image",
    meaning: "0.5 for the share of query words read in the image, 0.4 when they appear as the phrase, 0.1 for whole words", value: (h) => h.score }];
  if (doc.reranked) return [rerank, image];
  return [{ ...image, value: (h) => h.score }];
}

// "Hide near-duplicates": how many copies the hits shown stand for (each kept hit counts its own).
function collapsedText(hits, body) {
  if (!body.collapse_duplicates) return "";
  const n = hits.reduce((sum, h) => sum + (h.near_duplicates || 0), 0);
  return n ? ` · ${nearDuplicates(n)} hidden` : " · no near-duplicates among them";
}

function nearDuplicates(n) { return `${n} near-duplicate${n === 1 ? "" : "s"}`; }

function pill(text, kind, title) {
  const s = document.createElement("span");
  s.className = `score ${kind}`;
  s.textContent = text;
  s.title = title;
  return s;
}

function renderPager(n, body, reranked) {
  const pager = $("pager");
  pager.hidden = state.page === 1 && n < body.k;
  $("prev").disabled = state.page === 1;
  $("page-label").textContent = `Page ${state.page}`;
  // Reranking orders the first `candidates` hits; pages past them would rerank a wider pool.
  const capped = reranked && body.offset + body.k >= body.candidates;
  const end = body.offset + n >= state.info.items;  // the whole collection shown (a filter can only shrink it)
  $("next").disabled = n < body.k || capped || end;
  $("pager-note").textContent = capped && n === body.k
    ? `Reranking orders the first ${body.candidates} candidates; raise Candidates to see more.` : "";
}

// ---- image queries -----------------------------------------------------------------------
function setImageQuery(q) {
  state.imageQuery = q;
  $("image-query").hidden = false;
  $("image-query-name").textContent = q.name;
  $("image-query-thumb").src = q.preview || "";
  $("query").value = "";
  $("query").placeholder = "Searching by image (type words to search by text instead)";
}

function clearImageQuery(rerun) {
  state.imageQuery = null;
  $("image-query").hidden = true;
  $("image-file").value = "";
  $("query").placeholder = "Describe an image, e.g. a red bicycle by a wall";
  if (rerun) $("query").focus();
}

function readImageFile(file) {
  const limit = state.info ? state.info.limits.max_image_bytes : Infinity;
  if (file.size > limit) {
    showError(new ApiError(413, `${file.name} is ${(file.size / 1048576).toFixed(1)} MiB; this server accepts image queries up to ` +
      `${(limit / 1048576).toFixed(1)} MiB (mmr serve --max-image-mb).`));
    $("image-file").value = "";
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const url = String(reader.result);
    setImageQuery({ image: url.slice(url.indexOf(",") + 1), name: file.name, preview: url });
    search(1);
  };
  reader.onerror = () => showError(new Error(`cannot read ${file.name}`));
  reader.readAsDataURL(file);
}

// ---- detail view and heatmaps ------------------------------------------------------------
// What the file says about itself (mm_retrieval/media_meta.py: taken, place, camera, size).
function fileMetaRows(m) {
  const rows = [];
  const source = { exif: "from the photo", video: "from the video", file: "the file's time", table: "from the table" };
  if (m.taken) rows.push(["Taken", `${String(m.taken).replace("T", " ")}${source[m.taken_source] ? ` (${source[m.taken_source]})` : ""}`]);
  if (typeof m.lat === "number" && typeof m.lon === "number") {
    rows.push(["Place", `${m.lat.toFixed(5)}, ${m.lon.toFixed(5)}${typeof m.alt === "number" ? ` · ${m.alt} m` : ""}`]);
  }
  const camera = [m.make, m.model].filter((x) => typeof x === "string" && x).join(" ");
  if (camera) rows.push(["Camera", camera + (m.lens ? ` · ${m.lens}` : "")]);
  else if (m.lens) rows.push(["Lens", String(m.lens)]);
  if (m.width && m.height) rows.push(["Size", `${m.width} × ${m.height} px${m.duration ? ` · ${m.duration} s` : ""}`]);
  return rows;
}

async function openDetail(hit, doc) {
  const query = state.request && state.request.query !== undefined ? state.request.query.trim() : null;
  state.detail = { hit, query, explanation: null, word: -1, head: -1, image: null };
  const d = state.detail;
  $("detail").hidden = false;
  $("detail-title").textContent = basename(hit.path) + (isMoment(hit) ? ` · ${momentText(hit)}` : "");
  showPlayer(hit, d);
  // the player shows the moment already: the frame on the canvas below only earns its place with a heatmap
  $("detail").classList.toggle("frame-only", isMoment(hit) && !(state.info.explain && query));
  // no attention to show (no reranker that can explain, or an image query): no head picker, opacity or legend either
  $("detail").classList.toggle("no-attention", !(state.info.explain && query));
  const dl = $("detail-scores");
  dl.textContent = "";
  const cols = scoreColumns(doc, !query);
  const rows = [["Rank", `#${hit.rank} (by ${cols[0].name})`]];
  for (const c of cols) rows.push([c.name[0].toUpperCase() + c.name.slice(1), `${fmt(c.value(hit))} · ${c.meaning}`]);
  if (!doc.reranked) rows.push(["Reranker score", "– (not reranked)"]);
  if (isMoment(hit)) rows.push(["Moment", `${momentText(hit)} (${hit.start.toFixed(2)}–${hit.end.toFixed(2)} s; frame shown at ${fmt(hit.frame)} s)`]);
  if (hit.caption) rows.push(["Caption", hit.caption]);
  if (hit.near_duplicates) rows.push(["Near-duplicates", `${hit.near_duplicates} hidden (copies of this photo among the candidates)`]);
  rows.push(...fileMetaRows(hit.metadata || {}));
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    dl.append(dt, dd);
  }
  const meta = { id: hit.id, path: hit.path, metadata: hit.metadata };
  if (isMoment(hit)) Object.assign(meta, { video: hit.video, start: hit.start, end: hit.end, frame: hit.frame });
  $("detail-meta").textContent = JSON.stringify(meta, null, 2);
  $("words").textContent = "";
  $("head").textContent = "";
  $("explain").hidden = false;
  $("similar").disabled = hit.has_image === false;
  $("detail-close").focus();
  const canvas = $("heatmap");
  canvas.dataset.word = "";
  canvas.dataset.ready = "false";

  const image = new Image();
  const loaded = new Promise((resolve, reject) => { image.onload = resolve; image.onerror = () => reject(new Error("the image could not be loaded")); });
  try {
    await setImage(image, `image/${hit.id}`);
    await loaded;
  } catch (e) {
    if (state.detail !== d) return;
    $("explain-status").textContent = `Image unavailable: ${e.message}`;
    return;
  }
  if (state.detail !== d) return;
  d.image = image;
  draw();

  if (!state.info.explain || !query) {
    $("explain-status").textContent = !state.info.explain
      ? "No attention to show: this server has no cross-attention reranker (mmr serve --rerank DIR)."
      : "Attention maps are for text queries; this search was by image.";
    $("words").textContent = "";
    return;
  }
  $("explain-status").textContent = "Computing attention…";
  try {
    d.explanation = await (await postJSON("explain", { query, id: hit.id })).json();
  } catch (e) {
    if (state.detail === d) $("explain-status").textContent = `Could not compute attention: ${e.message}`;
    return;
  }
  if (state.detail !== d) return;
  const ex = d.explanation;
  buildWordButtons(ex.words);
  const head = $("head");
  head.append(new Option("mean over heads", "-1"));
  for (let h = 0; h < ex.heads; h++) head.append(new Option(`head ${h + 1}`, String(h)));
  head.value = "-1";
  $("explain-status").textContent =
    `${ex.grid[0]}×${ex.grid[1]} image patches. Reranker score ${fmt(ex.score)} · image similarity ${fmt(ex.retrieval_score)}.`;
  draw();
}

function buildWordButtons(words) {
  const box = $("words");
  box.textContent = "";
  const make = (label, index) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.word = String(index);
    b.setAttribute("aria-pressed", String(index === state.detail.word));
    b.addEventListener("click", () => { state.detail.word = index; updatePressed(); draw(); });
    box.append(b);
  };
  make("whole query", -1);
  words.forEach((w, i) => make(w, i));
}

function updatePressed() {
  for (const b of $("words").querySelectorAll("button")) b.setAttribute("aria-pressed", String(Number(b.dataset.word) === state.detail.word));
}

function closeDetail() {
  $("detail").hidden = true;
  state.detail = null;
  stopPlayer();
}

// ---- video moments -----------------------------------------------------------------------
// The player streams video/ID (range requests: it fetches only what it plays) and starts at the
// moment's `start`. A <video src> can't send the API key, so with a key it streams from a link the
// server signed for that video (GET video-link/ID).
async function showPlayer(hit, d) {
  const player = $("player");
  stopPlayer();
  $("player-box").hidden = !isMoment(hit);
  if (!isMoment(hit)) return;
  player.dataset.start = String(hit.start);
  player.dataset.ready = "false";
  $("player-note").textContent = `Plays ${basename(hit.video.path)} from the moment ${momentText(hit)}.`;
  // handler properties, not listeners: a later hit's player replaces them
  player.onloadedmetadata = () => {
    player.currentTime = Math.min(hit.start, Number.isFinite(player.duration) ? player.duration : hit.start);
  };
  player.onseeked = () => {  // the first seek is ours: from here on the user's
    player.onseeked = null;
    player.dataset.ready = "true";
    player.play().catch(() => { /* autoplay refused: the controls are there */ });
  };
  let src = `video/${hit.id}`;
  if (state.key) {  // a <video> can't send the key: the server signs a link to this one video
    try {
      src = (await (await api(`video-link/${hit.id}`)).json()).url;
    } catch (e) {
      if (state.detail === d) $("player-note").textContent = `Video unavailable: ${e.message}`;
      return;
    }
    if (state.detail !== d) return;  // another item's view opened meanwhile: it owns the player
  }
  player.src = src;
}

function stopPlayer() {
  const player = $("player");
  player.onloadedmetadata = player.onseeked = null;
  player.pause();
  if (player.getAttribute("src")) { player.removeAttribute("src"); player.load(); }  // stops the download
}

// The map to show: one word's (or the mean over words), averaged over heads or from one head.
function currentMap(ex, word, head) {
  const maps = head < 0 ? ex.maps : ex.head_maps[head];
  if (word >= 0) return maps[word];
  const [rows, cols] = ex.grid;
  const out = Array.from({ length: rows }, () => new Array(cols).fill(0));
  for (const m of maps) for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[r][c] += m[r][c] / maps.length;
  return out;
}

function draw() {
  const d = state.detail;
  if (!d || !d.image) return;
  const canvas = $("heatmap");
  const img = d.image;
  // at most 960 px on the longest side; small images are drawn larger so the heatmap is legible
  const longest = Math.max(img.naturalWidth, img.naturalHeight);
  const target = Math.min(960, Math.max(480, longest));
  const w = Math.max(1, Math.round(img.naturalWidth * target / longest));
  const h = Math.max(1, Math.round(img.naturalHeight * target / longest));
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(img, 0, 0, w, h);
  const ex = d.explanation;
  if (!ex) { $("viewer-note").textContent = ""; return; }
  // The encoder sees the centre square (resize the short side, centre-crop): draw the grid there
  // and dim what it never saw.
  const side = Math.min(w, h);
  const x0 = (w - side) / 2, y0 = (h - side) / 2;
  ctx.fillStyle = "rgba(0, 0, 0, 0.55)";
  if (w > h) { ctx.fillRect(0, 0, x0, h); ctx.fillRect(x0 + side, 0, w - x0 - side, h); }
  if (h > w) { ctx.fillRect(0, 0, w, y0); ctx.fillRect(0, y0 + side, w, h - y0 - side); }
  const map = currentMap(ex, d.word, d.head);
  const [rows, cols] = ex.grid;
  const flat = map.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat);
  const heat = document.createElement("canvas");
  heat.width = cols;
  heat.height = rows;
  const hctx = heat.getContext("2d");
  const px = hctx.createImageData(cols, rows);
  for (let i = 0; i < flat.length; i++) {
    const [r, g, b] = colour(hi > lo ? (flat[i] - lo) / (hi - lo) : 0);
    px.data.set([r, g, b, 255], i * 4);
  }
  hctx.putImageData(px, 0, 0);
  ctx.globalAlpha = Number($("opacity").value) / 100;
  ctx.drawImage(heat, x0, y0, side, side);  // smoothing on: a bilinear upsampling of the patch grid
  ctx.globalAlpha = 1;
  const word = d.word < 0 ? "whole query" : ex.words[d.word];
  canvas.dataset.word = word;
  canvas.dataset.head = String(d.head);
  canvas.dataset.ready = "true";
  $("viewer-note").textContent = `Attention of “${word}” (${d.head < 0 ? "mean over heads" : "head " + (d.head + 1)}), ` +
    "normalised to its own range, over the centre square the encoder sees.";
}

function colour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2);
  const f = x - i;
  return RAMP[i].map((v, k) => Math.round(v * (1 - f) + RAMP[i + 1][k] * f));
}

// ---- URL state: a search can be bookmarked or shared -------------------------------------
function saveHash(body, page) {
  const p = new URLSearchParams();
  if (body.query !== undefined) p.set("q", body.query);
  else if (body.image_id) p.set("image_id", body.image_id);
  else return;  // uploaded images are not put in the URL
  p.set("page", page);
  p.set("k", body.k);
  p.set("candidates", body.candidates);
  p.set("rerank", body.rerank === false ? "0" : "1");
  if (body.mode) p.set("mode", body.mode);
  if (body.group_by_video === false) p.set("group", "0");
  if (body.collapse_duplicates) p.set("dedupe", "1");
  if (body.filter) p.set("filter", body.filter);
  if (body.min_score !== undefined) p.set("min_score", body.min_score);
  if (body.sort) p.set("sort", body.sort);
  history.replaceState(null, "", "#" + p.toString());
}

function restoreHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (!p.has("q") && !p.has("image_id")) return false;
  if (p.has("q")) $("query").value = p.get("q");
  else setImageQuery({ image_id: p.get("image_id"), name: `item ${p.get("image_id").slice(0, 8)}…`, preview: state.key ? "" : `thumb/${p.get("image_id")}` });
  if (p.has("k")) $("per-page").value = p.get("k");
  if (p.has("candidates")) $("candidates").value = p.get("candidates");
  if (p.has("rerank") && !$("rerank").disabled) $("rerank").checked = p.get("rerank") === "1";
  if (p.has("mode")) $("mode").value = p.get("mode");
  $("group-by-video").checked = p.get("group") !== "0";
  $("collapse-duplicates").checked = p.get("dedupe") === "1";
  if (p.has("filter")) $("filter").value = p.get("filter");
  if (p.has("min_score")) $("min-score").value = p.get("min_score");
  if (p.has("sort")) $("sort").value = p.get("sort");
  search(Math.max(1, parseInt(p.get("page"), 10) || 1));
  return true;
}

// ---- wiring ------------------------------------------------------------------------------
function wire() {
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(1); });
  // Changing an option re-runs the current search from page 1.
  for (const id of ["rerank", "mode", "candidates", "per-page", "group-by-video", "collapse-duplicates", "min-score", "sort"]) {
    $(id).addEventListener("change", () => { if (state.request) search(1); });
  }
  $("prev").addEventListener("click", () => runPage(state.page - 1));
  $("next").addEventListener("click", () => runPage(state.page + 1));
  $("image-file").addEventListener("change", (e) => { if (e.target.files[0]) readImageFile(e.target.files[0]); });
  $("image-query-clear").addEventListener("click", () => clearImageQuery(true));
  $("detail-close").addEventListener("click", closeDetail);
  $("detail").addEventListener("click", (e) => { if (e.target === $("detail")) closeDetail(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("detail").hidden) closeDetail(); });
  $("head").addEventListener("change", () => { state.detail.head = Number($("head").value); draw(); });
  $("opacity").addEventListener("input", draw);
  $("similar").addEventListener("click", () => {
    const hit = state.detail.hit;
    closeDetail();
    setImageQuery({ image_id: hit.id, name: basename(hit.path), preview: state.key ? "" : `thumb/${hit.id}` });
    search(1);
  });
  $("key-save").addEventListener("click", async () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("mmr-api-key", state.key);
    if (await loadInfo()) { $("key-box").hidden = true; if (state.request) search(state.page); }
  });
}

wire();
loadInfo().then((ok) => { if (ok) restoreHash(); });

// xmodal search page: plain JS, same-origin API only (see xmodal/serve/app.py).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { health: null, key: "", objectUrls: [] };

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...headers() } });
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

function chosenNorm(modality) {
  if (!state.health || !$("hubness").checked) return "none";
  const norm = $("norm").value;
  return state.health.norms[modality].includes(norm) ? norm : "none";
}

// ITM re-ranking depth to ask for: the server's default, or (when it has none) up to 16; 0 = off.
function rerankDepth() {
  const r = state.health && state.health.rerank;
  if (!r || !r.available) return null;
  if (!$("rerank").checked) return 0;
  return r.default > 0 ? r.default : Math.min(16, r.max);
}

function updateRerankBadge() {
  const depth = rerankDepth();
  $("rerank-badge").hidden = !depth;
  $("rerank-badge").textContent = depth ? `ITM re-ranking · top ${depth}` : "ITM re-ranking";
}

function clearResults() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  $("results").replaceChildren();
}

async function loadThumb(img, url) {
  if (!state.health.auth) { img.src = url; return; }
  // With an API key the thumbnail request needs the header, which <img src> cannot send.
  try {
    const res = await fetch(url, { headers: headers() });
    if (!res.ok) throw new Error(String(res.status));
    const objectUrl = URL.createObjectURL(await res.blob());
    state.objectUrls.push(objectUrl);
    img.src = objectUrl;
  } catch (_) { img.alt = "thumbnail unavailable"; }
}

function render(data, label) {
  clearResults();
  const grid = $("results");
  for (const hit of data.results) {
    const card = document.createElement("article");
    card.className = "result";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.alt = hit.caption || hit.id;
    img.loading = "eager";
    img.decoding = "async";
    loadThumb(img, hit.thumb);
    const body = document.createElement("div");
    body.className = "body";
    const cap = document.createElement("div");
    cap.className = "caption";
    cap.textContent = hit.caption || "";
    const meta = document.createElement("div");
    meta.className = "meta";
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    id.title = hit.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = Number(hit.score).toFixed(3);
    meta.append(id);
    if (data.rerank) {
      const itm = document.createElement("span");
      itm.className = "itm";
      itm.textContent = hit.itm === null || hit.itm === undefined ? "ITM —" : `ITM ${Number(hit.itm).toFixed(2)}`;
      itm.title = "image–text matching log-odds (the re-ranking score)";
      score.title = `retrieval score; retrieval rank ${hit.retrieval_rank}`;
      meta.append(itm);
    }
    meta.append(score);
    body.append(cap, meta);
    card.append(img, body);
    grid.append(card);
  }
  const norm = data.norm && data.norm !== "none" ? ` · ${data.norm}` : "";
  const rr = data.rerank ? ` · re-ranked by ITM (top ${data.rerank.depth})` : "";
  setStatus(`${data.results.length} ${label}${norm}${rr} · ${data.took_ms} ms`);
  grid.dataset.reranked = data.rerank ? "1" : "0";
  grid.dataset.kind = data.target === "captions" ? "captions" : (typeof data.query === "string" ? "text" : "image");
}

async function searchText(event) {
  if (event) event.preventDefault();
  const q = $("q").value.trim();
  if (!q) { setStatus("Type something to search for.", true); return; }
  const params = new URLSearchParams({ q, k: $("k").value, norm: chosenNorm("text") });
  const depth = rerankDepth();
  if (depth !== null) params.set("rerank", String(depth));
  $("search-btn").disabled = true;
  setStatus("searching…");
  try {
    render(await api(`/search?${params}`), "images");
  } catch (err) {
    clearResults();
    setStatus(err.message, true);
  } finally {
    $("search-btn").disabled = false;
  }
}

async function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && file.type !== "") {
    setStatus(`${file.name}: not an image`, true);
    return;
  }
  const preview = $("query-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const captions = !$("captions-controls").hidden && $("captions").checked;
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  form.append("k", $("k").value);
  form.append("norm", captions ? "none" : chosenNorm("image"));
  form.append("target", captions ? "captions" : "images");
  const depth = rerankDepth();
  if (captions && depth !== null) form.append("rerank", String(depth));  // image → image: no ITM
  setStatus("searching by image…");
  try {
    render(await api("/search/image", { method: "POST", body: form }), captions ? "captions" : "similar images");
  } catch (err) {
    clearResults();
    setStatus(err.message, true);
  }
}

function setupDrop() {
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) searchImage(file);
  });
  // Dropping anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("file").addEventListener("change", (e) => { searchImage(e.target.files[0]); e.target.value = ""; });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) searchImage(item.getAsFile());
  });
}

async function init() {
  $("search-form").addEventListener("submit", searchText);
  $("api-key").value = sessionStorage.getItem("xmodal-api-key") || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem("xmodal-api-key", $("api-key").value));
  setupDrop();
  try {
    const h = await api("/health");
    state.health = h;
    $("info").textContent = `${h.items.toLocaleString()} items · ${h.kind} index` + (h.model ? ` · model ${h.model}` : "");
    $("key-controls").hidden = !h.auth;
    $("captions-controls").hidden = !h.captions;
    const norms = [...new Set([...h.norms.text, ...h.norms.image])].filter((n) => n !== "none");
    if (norms.length) {
      $("hub-controls").hidden = false;
      $("norm").replaceChildren(...norms.map((n) => new Option(n, n)));
    }
    if (h.rerank && h.rerank.available) {
      $("rerank-controls").hidden = false;
      $("rerank").checked = h.rerank.default > 0;
      $("rerank").addEventListener("change", updateRerankBadge);
      updateRerankBadge();
    }
    if (!h.model_ready) setStatus("The model is not available on this server: only browsing works.", true);
    document.body.dataset.ready = "1";
  } catch (err) {
    $("info").textContent = "server unavailable";
    setStatus(err.message, true);
  }
}

init();

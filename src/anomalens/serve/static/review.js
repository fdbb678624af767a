// The inspector's review page: plain JS against the /api/review endpoints (serve/review.py).
"use strict";

const PAGE = 60;
const state = { items: [], focus: 0, total: 0, threshold: 1.0, filter: "all" };
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  // with a token configured the login form set an HttpOnly cookie, which every fetch here sends
  const response = await fetch(path, options);
  if (response.status === 401) {
    // the session ended (a new token, a cleared cookie): log in again and come back
    location.href = `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.detail || `${response.status} ${response.statusText}`);
  }
  return response.json();
}

function showStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

// file names come from uploads: never trust them as HTML
const esc = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);

async function refreshStats() {
  const s = await api(`/api/review/stats?threshold=${state.threshold}`);
  $("n-total").textContent = s.n_total;
  $("n-pass").textContent = s.n_pass;
  $("n-flagged").textContent = s.n_flagged;
  $("n-labelled").textContent = `${s.n_labelled} / ${s.n_total}`;
  $("n-since-refine").textContent = s.labels_since_refine;
  $("n-defect").textContent = s.n_defect;
  $("n-good").textContent = s.n_good;
  $("recall").textContent = pct(s.recall);
  $("far").textContent = pct(s.false_alarm_rate);
  $("recall").title = s.recall === null ? "mark some images as defect first" : `${s.n_defect_caught} of ${s.n_defect} marked defects flagged`;
  $("far").title = s.false_alarm_rate === null ? "mark some images as good first" : `${s.n_good_flagged} of ${s.n_good} marked goods flagged`;
}

function verdict(item) {
  return item.normalized_score >= state.threshold ? "flagged" : "pass";
}

function cardHtml(item, index) {
  const regions = item.regions.length
    ? item.regions.slice(0, 4).map((r) => `(${r.x0}, ${r.y0})–(${r.x1}, ${r.y1}) · ${r.area} px · peak ${r.peak.toFixed(2)}`).join("<br>")
      + (item.regions.length > 4 ? `<br>+ ${item.regions.length - 4} more` : "")
    : "no defect region";
  // drift: the image lies outside the training goods' range, so its verdict is less certain
  const drift = (item.drift || []).length
    ? `<div class="drift" data-testid="drift" title="${esc(item.drift.map((d) => d.message).join("\n"))}">`
      + `⚠ unlike the training goods: ${esc(item.drift[0].message)}`
      + (item.drift.length > 1 ? ` (+${item.drift.length - 1} more)` : "") + "</div>"
    : "";
  return `
    <figure class="overlay"><img loading="lazy" alt="${esc(item.name)}: image and anomaly overlay" src="/api/review/items/${item.id}/overlay"></figure>
    <div class="meta">
      <div class="row"><span class="name" title="${esc(item.path)}">${index + 1}. ${esc(item.name)}</span>
        <span class="score">${item.normalized_score.toFixed(2)}</span></div>
      <div class="row"><span class="verdict ${verdict(item)}">${verdict(item)}</span>
        <span class="label ${item.label || "none"}" data-testid="label">${item.label || "not reviewed"}</span></div>
      <div class="regions">${regions}</div>
      ${drift}
    </div>`;
}

function render() {
  const gallery = $("gallery");
  gallery.innerHTML = "";
  state.items.forEach((item, i) => {
    const card = document.createElement("article");
    card.className = "card" + (i === state.focus ? " focused" : "");
    card.dataset.id = item.id;
    card.tabIndex = -1;
    card.innerHTML = cardHtml(item, i);
    card.addEventListener("click", () => setFocus(i));
    gallery.appendChild(card);
  });
  $("more").hidden = state.items.length >= state.total;
  if (!state.items.length) gallery.innerHTML = '<p class="empty">No scored images here yet.</p>';
}

function updateCard(i) {
  const card = $("gallery").children[i];
  if (card) {
    card.innerHTML = cardHtml(state.items[i], i);
  }
}

function setFocus(i) {
  if (!state.items.length) return;
  const cards = $("gallery").children;
  cards[state.focus]?.classList.remove("focused");
  state.focus = Math.max(0, Math.min(i, state.items.length - 1));
  const card = cards[state.focus];
  card.classList.add("focused");
  card.scrollIntoView({ block: "nearest", behavior: "smooth" });
}

// `advance` moves the focus at once, so a fast "d d g" labels three cards, not one
async function setLabel(label, advance = false) {
  const index = state.focus;
  const item = state.items[index];
  if (!item) return;
  if (advance) setFocus(index + 1);
  try {
    const saved = await api(`/api/review/items/${item.id}/label`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ label }),
    });
    Object.assign(item, saved);
    updateCard(index);
    showStatus(`saved: ${item.name} ${label ? "marked " + label : "label cleared"}`);
    await refreshStats();
  } catch (err) {
    showStatus(`not saved: ${err.message}`, true);
  }
}

async function loadItems(append = false) {
  const offset = append ? state.items.length : 0;
  const page = await api(`/api/review/items?offset=${offset}&limit=${PAGE}&filter=${state.filter}`);
  state.items = append ? state.items.concat(page.items) : page.items;
  state.total = page.total;
  if (!append) state.focus = 0;
  render();
}

async function init() {
  const summary = await api("/api/review/summary");
  $("model").textContent = `${summary.detector} · model ${summary.model_id}`;
  // labels `anomalens refine` has not trained on yet: since its last run, or all of them
  $("since-refine-label").textContent = summary.refined_at ? `labels since refine (${summary.refined_at.slice(0, 10)})` : "labels, never refined";
  const slider = $("threshold");
  slider.min = Math.min(0, Math.floor(summary.score_min * 10) / 10);
  slider.max = Math.max(2, Math.ceil(summary.score_max * 10) / 10);
  slider.addEventListener("input", () => {
    state.threshold = Number(slider.value);
    $("threshold-value").textContent = state.threshold.toFixed(2);
    state.items.forEach((_, i) => updateCard(i));
    refreshStats().catch((err) => showStatus(err.message, true));
  });
  $("reset-threshold").addEventListener("click", () => {
    slider.value = 1;
    slider.dispatchEvent(new Event("input"));
  });
  $("filter").addEventListener("change", (e) => {
    state.filter = e.target.value;
    loadItems().catch((err) => showStatus(err.message, true));
  });
  $("more").addEventListener("click", () => loadItems(true));
  document.addEventListener("keydown", (e) => {
    if (e.target.matches("input, select, textarea") || e.ctrlKey || e.metaKey || e.altKey) return;
    const actions = {
      j: () => setFocus(state.focus + 1), ArrowRight: () => setFocus(state.focus + 1),
      k: () => setFocus(state.focus - 1), ArrowLeft: () => setFocus(state.focus - 1),
      d: () => setLabel("defect", true),
      g: () => setLabel("good", true),
      u: () => setLabel(null),
    };
    if (actions[e.key]) {
      e.preventDefault();
      actions[e.key]();
    }
  });
  await loadItems();
  await refreshStats();
  document.body.dataset.ready = "1";
}

init().catch((err) => showStatus(`cannot load the review data: ${err.message}`, true));

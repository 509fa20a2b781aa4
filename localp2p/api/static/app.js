// The nodes page: polls /api/p2p and /api/status and renders them.
// Every value from the server goes into the DOM through textContent or an attribute,
// never innerHTML: worker names and addresses come from other machines.
"use strict";

// Milliseconds between refreshes.
const REFRESH_MS = 2000;
// Where the API key (when the server asks for one) is kept between visits.
const KEY_STORAGE = "localp2p.apiKey";
// Rows of the recent-requests table shown at most.
const MAX_REQUESTS = 25;

const $ = (id) => document.getElementById(id);

class AuthNeeded extends Error {}

// Build an element: el("td", {className: "x", dataset: {id: "1"}}, "text", child, ...).
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "title") node.title = value;
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmtBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function fmtNumber(n, digits) {
  return typeof n === "number" && isFinite(n) ? n.toFixed(digits) : "—";
}

function fmtMs(ms) {
  if (typeof ms !== "number" || !isFinite(ms)) return "—";
  return ms < 1000 ? ms.toFixed(0) + " ms" : (ms / 1000).toFixed(2) + " s";
}

// A wall-clock time from the server: epoch seconds or an ISO string.
function toDate(t) {
  if (typeof t === "number") return new Date(t * 1000);
  if (typeof t === "string" && t) { const d = new Date(t); return isNaN(d) ? null : d; }
  return null;
}

function fmtAgo(t) {
  const d = toDate(t);
  if (!d) return "never";
  const s = Math.max(0, (Date.now() - d.getTime()) / 1000);
  if (s < 60) return s.toFixed(0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  return d.toLocaleString();
}

function memoryBar(free, total) {
  const bar = el("div", {className: "bar"});
  const fill = el("div", {className: "fill"});
  const known = typeof total === "number" && total > 0;
  const usedFraction = known ? Math.min(1, Math.max(0, (total - (free || 0)) / total)) : 0;
  fill.style.width = (usedFraction * 100).toFixed(1) + "%";
  bar.append(fill);
  return el("div", {className: "mem", dataset: {free: String(free ?? ""), total: String(total ?? "")}},
    bar,
    el("span", {className: "mem-text"}, known ? fmtBytes(free) + " free of " + fmtBytes(total) : "memory unknown"));
}

async function fetchJSON(path) {
  const headers = {};
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, {headers, cache: "no-store"});
  if (response.status === 401) throw new AuthNeeded(key ? "the API key was refused" : "");
  if (response.status === 404) return null;
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
    throw new Error(path + ": " + message);
  }
  return response.json();
}

function showAuth(message) {
  $("auth").hidden = false;
  $("auth-error").textContent = message || "";
}

function renderNode(p2p) {
  const node = p2p && p2p.node;
  $("node-section").hidden = !p2p;
  $("network-id").textContent = (p2p && (p2p.network_id || (node && node.network_id))) || "—";
  $("node-peer-id").textContent = (node && node.peer_id) || "—";
  const addrs = (node && node.addrs) || [];
  $("node-addrs").replaceChildren(...addrs.map((a) => el("li", {}, el("code", {}, a))));
}

function renderWorkers(p2p) {
  $("workers-section").hidden = !p2p;
  if (!p2p) return;
  const workers = p2p.workers || [];
  const online = workers.filter((w) => w.online).length;
  $("workers-count").textContent = "(" + online + " online of " + workers.length + ")";
  $("workers-empty").hidden = workers.length > 0;
  $("workers").replaceChildren(...workers.map((w) => {
    const state = String(w.state || "unknown");
    return el("div", {className: "worker", dataset: {peerId: String(w.peer_id), state: state, online: String(!!w.online)}},
      el("div", {className: "head"},
        el("span", {className: "dot " + (w.online ? "online" : "offline"), title: state}),
        el("span", {className: "name"}, w.name || "(unnamed)"),
        el("span", {className: "state state-" + state.replace(/[^a-z]/g, "")}, state)),
      el("code", {className: "peer-id"}, w.peer_id),
      memoryBar(w.memory_free, w.memory_total),
      el("dl", {className: "stats"},
        el("dt", {}, "layers"), el("dd", {className: "layers"}, String(w.layers ?? 0)),
        el("dt", {}, "devices"), el("dd", {className: "devices"},
          (w.devices || []).map((d) => d.name + " (" + d.kind + ", " + fmtBytes(d.memory_total) + ")").join(", ") || "—"),
        el("dt", {}, "sent"), el("dd", {className: "bytes-sent"}, fmtBytes(w.bytes_sent)),
        el("dt", {}, "received"), el("dd", {className: "bytes-received"}, fmtBytes(w.bytes_received)),
        el("dt", {}, "rtt"), el("dd", {className: "rtt"}, typeof w.rtt_ms === "number" ? fmtNumber(w.rtt_ms, 1) + " ms" : "—"),
        el("dt", {}, "link"), el("dd", {className: "link"}, w.link ? (w.link === "relayed" && w.relay ? "relayed via " + String(w.relay).slice(-8) : w.link) : "—"),
        el("dt", {}, "last seen"), el("dd", {className: "last-seen"}, fmtAgo(w.last_seen))));
  }));
}

function renderMesh(p2p) {
  $("mesh-section").hidden = !p2p;
  if (!p2p) return;
  const servers = p2p.servers || [];
  const clients = p2p.clients || [];
  $("mesh-count").textContent = "(" + servers.filter((s) => s.online).length + " servers online, " + clients.length + " peers using this API)";
  $("mesh-empty").hidden = servers.length + clients.length > 0;
  const rows = servers.map((s) => el("tr", {className: "mesh-server", dataset: {peerId: String(s.peer_id)}},
    el("td", {}, "server"), el("td", {}, s.name || "—"), el("td", {}, el("code", {}, String(s.peer_id).slice(-12))),
    el("td", {}, s.online ? "online" : String(s.state || "offline")), el("td", {}, (s.models || []).join(", ") || "—"),
    el("td", {}, String(s.admitted ?? 0) + " queued or running" + (typeof s.tokens_per_second === "number" ? ", " + fmtNumber(s.tokens_per_second, 1) + " tok/s" : "")),
    el("td", {}, String(s.requests_forwarded ?? 0) + " sent there")));
  for (const c of clients) {
    rows.push(el("tr", {className: "mesh-client", dataset: {peerId: String(c.peer_id)}},
      el("td", {}, String(c.role || "peer")), el("td", {}, c.name || "—"), el("td", {}, el("code", {}, String(c.peer_id).slice(-12))),
      el("td", {}, (c.connected ? "connected" : "gone") + (c.admitted ? "" : ", refused by the firewall")), el("td", {}, "—"),
      el("td", {}, String(c.requests_in_flight ?? 0) + " in flight"), el("td", {}, String(c.requests_served ?? 0) + " served")));
  }
  $("mesh-rows").replaceChildren(...rows);
}

function renderBackend(status, p2p) {
  const backend = status.backend || {};
  const state = String(backend.state || "unknown");
  const stateNode = $("backend-state");
  stateNode.textContent = state;
  stateNode.className = "state state-" + state.replace(/[^a-z]/g, "");
  $("backend-model").textContent = status.model || "—";
  const layers = status.layers || {};
  $("layers-total").textContent = String(layers.total ?? "—");
  $("layers-local").textContent = String(layers.local ?? "—");
  $("backend-restarts").textContent = String(backend.restarts ?? 0);
  const error = $("backend-error");
  error.hidden = !backend.last_error;
  error.textContent = backend.last_error ? "last error: " + backend.last_error : "";

  // In p2p mode device endpoints are local tunnel ports: name the worker behind each.
  const byEndpoint = {};
  for (const w of (p2p && p2p.workers) || []) {
    if (w.tunnel_port) byEndpoint["127.0.0.1:" + w.tunnel_port] = w.name || w.peer_id;
  }
  const devices = status.devices || [];
  $("devices-empty").hidden = devices.length > 0;
  $("devices").querySelector("tbody").replaceChildren(...devices.map((d) => el("tr",
    {className: "device" + (d.used ? " used" : " skipped"), dataset: {endpoint: String(d.endpoint), used: String(!!d.used)}},
    el("td", {className: "endpoint"}, el("code", {}, d.endpoint)),
    el("td", {className: "worker-name col-worker"}, byEndpoint[d.endpoint] || "—"),
    el("td", {className: "used"}, d.used ? "yes" : "skipped" + (d.skipped_reason ? ": " + d.skipped_reason : "")),
    el("td", {className: "layers"}, String(d.layers ?? 0)),
    el("td", {}, memoryBar(d.memory_free, d.memory_total)))));
}

function renderLoadProgress(progress) {
  const box = $("load-progress");
  const active = !!(progress && progress.active);
  box.hidden = !active;
  if (!active) return;
  const fraction = Math.min(1, Math.max(0, Number(progress.fraction) || 0));
  $("load-percent").textContent = (fraction * 100).toFixed(0) + "%";
  $("load-fill").style.width = (fraction * 100).toFixed(1) + "%";
  const parts = [];
  if (typeof progress.bytes_total === "number" && progress.bytes_total > 0) {
    parts.push(fmtBytes(progress.bytes_sent) + " of " + fmtBytes(progress.bytes_total));
  }
  if (typeof progress.rate_bytes_per_s === "number") parts.push(fmtBytes(progress.rate_bytes_per_s) + "/s");
  if (typeof progress.eta_s === "number") parts.push("about " + progress.eta_s.toFixed(0) + " s left");
  if (progress.from_cache) parts.push("from worker caches");
  $("load-detail").textContent = parts.join(" · ");
  // Per worker: where its share of the weights came from before llama.cpp loaded (issue 16).
  const weights = progress.weights || {};
  $("load-weights").replaceChildren(...Object.keys(weights).sort().map((name) => {
    const w = weights[name] || {};
    const from = [["own copy", w.local], ["peers", w.peers], ["server", w.server], ["cache", w.cached]]
      .filter(([, n]) => Number(n) > 0).map(([label, n]) => fmtBytes(n) + " " + label);
    let text = name + ": " + (from.join(", ") || "nothing yet") + " of " + fmtBytes(w.total || 0);
    if (w.error) text += " · no plan (" + w.error + "); llama.cpp sends it";
    else if (w.done && Number(w.missing) > 0) text += " · " + fmtBytes(w.missing) + " left to llama.cpp";
    if (Number(w.corrupt) > 0) text += " · " + w.corrupt + " bad tensors from " + (w.bad_peers || []).join(", ") + ", fetched again";
    return el("li", {className: "load-weights-worker", dataset: {worker: name}}, text);
  }));
}

function renderRequests(requests) {
  const list = Array.isArray(requests) ? requests.slice(0, MAX_REQUESTS) : [];
  $("requests-empty").hidden = list.length > 0;
  $("requests").querySelector("tbody").replaceChildren(...list.map((r) => {
    const when = toDate(r.time);
    const ok = typeof r.status === "number" ? r.status < 400 : r.status === "ok";
    return el("tr", {className: "request" + (ok ? "" : " failed"), dataset: {id: String(r.id ?? "")}},
      el("td", {className: "time"}, when ? when.toLocaleTimeString() : "—"),
      el("td", {className: "endpoint"}, (r.endpoint || "—") + (r.stream ? " (stream)" : "")),
      el("td", {className: "model"}, r.model || "—"),
      el("td", {className: "status"}, String(r.status ?? "—")),
      el("td", {className: "prompt-tokens num"}, String(r.prompt_tokens ?? "—")),
      el("td", {className: "completion-tokens num"}, String(r.completion_tokens ?? "—")),
      el("td", {className: "ttft num"}, fmtMs(r.ttft_ms)),
      el("td", {className: "duration num"}, fmtMs(r.duration_ms)),
      el("td", {className: "tokens-per-second num"}, fmtNumber(r.tokens_per_second, 1)));
  }));
}

let timer = null;      // the pending refresh
let inFlight = false;  // a refresh is running
let soon = false;      // refresh again right after the one running

function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(refresh, ms);
}

async function refresh() {
  inFlight = true;
  const status_ = $("refresh-status");
  try {
    const [p2p, status] = await Promise.all([fetchJSON("/api/p2p"), fetchJSON("/api/status")]);
    $("auth").hidden = true;
    document.body.dataset.mode = p2p ? "p2p" : "static";
    $("mode").textContent = p2p ? "p2p" : "static";
    renderNode(p2p);
    renderWorkers(p2p);
    renderMesh(p2p);
    if (status) {
      renderBackend(status, p2p);
      renderLoadProgress(status.load_progress);
      renderRequests(status.recent_requests);
    }
    status_.textContent = "updated " + new Date().toLocaleTimeString();
    status_.dataset.ok = "true";
    document.body.dataset.loaded = "true";
  } catch (err) {
    if (err instanceof AuthNeeded) showAuth(err.message);
    status_.textContent = err instanceof AuthNeeded ? "waiting for an API key" : "cannot refresh: " + err.message;
    status_.dataset.ok = "false";
  } finally {
    inFlight = false;
    schedule(soon ? 0 : REFRESH_MS);
    soon = false;
  }
}

$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  $("auth-error").textContent = "";
  if (inFlight) soon = true;
  else schedule(0);
});

refresh();

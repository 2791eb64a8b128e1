// The node's dashboard: polls /api/state every 2 s and redraws. Text from peers (refusal
// reasons, log lines) is only ever set as textContent, never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const token = new URLSearchParams(location.search).get("token");
if (token) {
  // The server set a same-site cookie with the token: keep it out of the address bar.
  history.replaceState(null, "", location.pathname);
}
const headers = token ? { Authorization: "Bearer " + token } : {};

const $ = (id) => document.getElementById(id);

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return digits === undefined ? String(v) : Number(v).toFixed(digits);
}

function when(t) {
  return t ? new Date(t * 1000).toLocaleString() : "–";
}

function shortPeer(p) {
  return p.length > 16 ? p.slice(0, 8) + "…" + p.slice(-6) : p;
}

// Sets a stat card: the exact value in data-value (what the browser test reads), a readable
// rendering as text.
function stat(key, value, text) {
  const el = $("stat-" + key);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text;
}

function cell(row, text, cls, title) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  if (title) td.title = title;
  return td;
}

function fillTable(id, items, fill) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const item of items) fill(body.insertRow(), item);
  if (!items.length) {
    const td = body.insertRow().insertCell();
    td.colSpan = $(id).tHead.rows[0].cells.length;
    td.className = "muted";
    td.textContent = "none";
  }
}

// ---------------------------------------------------------------------------------- charts

const charts = {};

function makeChart(id, series, axes) {
  const el = $(id);
  const opts = {
    width: Math.max(300, el.parentElement.clientWidth - 16),
    height: 220,
    scales: { x: { time: true } },
    series: [{}, ...series],
    axes: [{}, ...axes],
    legend: { live: false },
  };
  charts[id] = new uPlot(opts, [[], ...series.map(() => [])], el);
}

makeChart(
  "chart-learning",
  [
    { label: "test accuracy", stroke: "#1a7f37", scale: "acc", width: 2 },
    { label: "local accuracy", stroke: "#7fbf7f", scale: "acc" },
    { label: "loss", stroke: "#b42318", scale: "loss" },
  ],
  [{ scale: "acc", label: "accuracy" }, { scale: "loss", side: 1, label: "loss", grid: { show: false } }],
);
makeChart(
  "chart-traffic",
  [
    { label: "sent", stroke: "#4c78a8", width: 2 },
    { label: "received", stroke: "#f58518", width: 2 },
  ],
  [{ label: "KiB/s" }],
);
makeChart(
  "chart-syncs",
  [
    { label: "syncs", stroke: "#54a24b", scale: "syncs", width: 2 },
    { label: "community syncs", stroke: "#b279a2", scale: "syncs", width: 2 },
    { label: "connected peers", stroke: "#9d755d", scale: "peers" },
  ],
  [{ scale: "syncs", label: "syncs" }, { scale: "peers", side: 1, label: "peers", grid: { show: false } }],
);

function rate(t, total) {
  const out = [null];
  for (let i = 1; i < t.length; i++) {
    const dt = t[i] - t[i - 1];
    const d = total[i] - total[i - 1];
    out.push(dt > 0 && total[i] !== null && total[i - 1] !== null ? d / dt / 1024 : null);
  }
  return out;
}

function drawCharts(h) {
  charts["chart-learning"].setData([h.t, h.test_accuracy, h.local_accuracy, h.loss]);
  charts["chart-traffic"].setData([h.t, rate(h.t, h.bytes_sent), rate(h.t, h.bytes_received)]);
  charts["chart-syncs"].setData([h.t, h.syncs, h.community_syncs, h.peers]);
}

// ----------------------------------------------------------------------------------- tables

function drawPeers(peers) {
  const total = Math.max(1, ...peers.map((p) => (p.bytes_sent || 0) + (p.bytes_received || 0)));
  fillTable("peers", peers, (row, p) => {
    row.dataset.peer = p.peer;
    cell(row, shortPeer(p.peer), "mono", p.peer);
    const state = p.refused && p.state !== "connected" ? "refused" : p.state;
    cell(row, state, "state-" + state.replace(" ", "-"));
    cell(row, p.neighbour ? "yes" : "");
    cell(row, p.found_via || "", "", (p.addrs || []).join("\n"));
    cell(row, (p.communities || []).join(", "));
    cell(row, bytes(p.bytes_sent || 0), "num");
    cell(row, bytes(p.bytes_received || 0), "num");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = (100 * ((p.bytes_sent || 0) + (p.bytes_received || 0))) / total + "%";
    row.insertCell().append(bar);
    cell(row, num(p.refused || 0), "num");
    cell(row, p.last_refusal || "", "", p.last_refusal_at ? when(p.last_refusal_at) : "");
  });
}

function drawCommunities(list) {
  fillTable("communities", list, (row, c) => {
    row.dataset.community = c.id;
    cell(row, c.name);
    cell(row, c.id.slice(0, 12), "mono", c.id);
    cell(row, c.admission || "");
    cell(row, c.protocol);
    cell(row, c.shared.join(", "));
    cell(row, c.members.map(shortPeer).join("\n"), "mono", c.members.join("\n"));
    cell(row, num(c.syncs), "num");
    cell(row, bytes(c.bytes_sent), "num");
    cell(row, bytes(c.bytes_received), "num");
    cell(row, num(c.rejected), "num");
    const recent = (c.recent_refusals || []).slice(-3).reverse();
    cell(row, recent.map((r) => shortPeer(r.peer) + ": " + r.reason).join("\n"));
  });
}

function drawCheckpoints(files, step) {
  $("checkpoint-step").textContent = "last checkpoint at step " + num(step);
  fillTable("checkpoints", files, (row, f) => {
    cell(row, f.name, "mono");
    cell(row, bytes(f.bytes), "num");
    cell(row, when(f.written));
  });
}

function drawLog(lines) {
  const pre = $("log");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.replaceChildren();
  for (const line of lines) {
    const span = document.createElement("span");
    span.className = line.level;
    const time = new Date(line.t * 1000).toLocaleTimeString();
    span.textContent = `${time} ${line.level} ${line.logger}: ${line.message}\n`;
    pre.append(span);
  }
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

// ------------------------------------------------------------------------------------- poll

function draw(state) {
  const s = state.status;
  $("peer-id").textContent = s.peer_id;
  stat("step", s.step, s.steps ? `${s.step} / ${s.steps}` : String(s.step));
  stat("syncs", s.syncs, num(s.syncs));
  stat("loss", s.loss, num(s.loss, 4));
  stat("test_accuracy", s.test_accuracy, num(s.test_accuracy, 4));
  stat("local_accuracy", s.local_accuracy, num(s.local_accuracy, 4));
  stat("peers", s.peers.length, num(s.peers.length));
  stat("bytes_sent", s.bytes_sent, bytes(s.bytes_sent));
  stat("bytes_received", s.bytes_received, bytes(s.bytes_received));
  stat("rejected", s.rejected, num(s.rejected));
  stat("protocol", s.protocol, s.protocol);
  $("addrs").replaceChildren(...s.listen_addrs.map((a) => {
    const li = document.createElement("li");
    li.textContent = a;
    return li;
  }));
  drawCharts(state.history);
  drawPeers(state.peer_table);
  drawCommunities(s.communities);
  drawCheckpoints(state.checkpoints, s.checkpoint_step);
  drawLog(state.log);
}

async function poll() {
  const live = $("live");
  try {
    const reply = await fetch("/api/state", { headers, credentials: "same-origin", cache: "no-store" });
    if (!reply.ok) throw new Error(`${reply.status} ${(await reply.text()).trim()}`);
    draw(await reply.json());
    live.textContent = "updated " + new Date().toLocaleTimeString();
    live.dataset.ok = "1";
  } catch (err) {
    live.textContent = "cannot reach the node: " + err.message;
    live.dataset.ok = "";
  }
  setTimeout(poll, POLL_MS);
}

poll();

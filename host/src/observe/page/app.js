// The live tree view of agent-host: the tree as /api/status has it, kept
// current by the server-sent events of /api/events. Each node's element is
// made once and then only its changed fields are written, so that a tree
// of a thousand nodes stays responsive; subtrees collapse.
"use strict";

const TOKEN_HEADER = "X-Agent-Host-Token";
const $ = (id) => document.getElementById(id);

// path -> { li, row fields..., last: the last values written }
const nodes = new Map();
let rootName = null;
let selected = null;
let control = false;

// ---- the control token: from the URL's fragment (#token=...), kept for the tab only
(function takeToken() {
  const m = /(?:^|[#&])token=([0-9a-f]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("agent-host-token", m[1]);
    history.replaceState(null, "", location.pathname);
  }
})();
const token = () => sessionStorage.getItem("agent-host-token");

// ---- formatting
function variant(v) { return typeof v === "string" ? v : v ? Object.keys(v)[0] : ""; }
function fmtReason(r) {
  if (r === null || r === undefined) return "";
  if (typeof r !== "object") return String(r);
  const k = Object.keys(r)[0];
  const inner = fmtReason(r[k]);
  return inner ? `${k}: ${inner}` : k;
}
function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(0) + " KiB";
  return n + " B";
}
function fmtFuel(n) {
  if (n === null || n === undefined) return "";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(0) + "k";
  return String(n);
}
function fmtTime(t) { return t ? new Date(t).toLocaleTimeString() : "-"; }
function statusClass(node) {
  if (node.circuit && variant(node.circuit) === "Open") return "parked";
  return variant(node.status).toLowerCase();
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function parentPath(path) { return path.slice(0, path.lastIndexOf("/")); }

// ---- the tree
function makeNode(node) {
  const li = el("li", node.kind);
  li.dataset.path = node.path;
  li.setAttribute("role", "treeitem");
  const row = el("div", "row");
  const toggle = el("button", "toggle", "▼");
  toggle.type = "button";
  toggle.title = "collapse or expand";
  toggle.addEventListener("click", (e) => { e.stopPropagation(); li.classList.toggle("collapsed"); });
  const f = {
    li, dot: el("span", "dot"), name: el("span", "name", node.name),
    restarts: el("span", "restarts"), exit: el("span", "exit"), meta: el("span", "meta"),
    children: el("ul"), last: {},
  };
  row.append(toggle, f.dot, f.name, f.restarts, f.exit, f.meta);
  row.addEventListener("click", () => select(node.path));
  li.append(row, f.children);
  return f;
}

// Write `value` into `elem`'s `prop` only if it changed.
function set(f, key, apply, value) {
  if (f.last[key] === value) return;
  f.last[key] = value;
  apply(value);
}

function setRestarts(f, count) {
  set(f, "restarts", (v) => {
    f.restarts.textContent = "↻ " + v;
    f.restarts.classList.toggle("some", v > 0);
    f.li.dataset.restarts = v;
  }, count);
}

function updateNode(f, node, supervisor) {
  set(f, "status", (v) => { f.dot.className = "dot s-" + v; f.li.dataset.status = v; f.dot.title = v; }, statusClass(node));
  setRestarts(f, node.restart_count);
  set(f, "exit", (v) => { f.exit.textContent = v; f.exit.title = v; }, node.last_exit ? "last exit: " + fmtReason(node.last_exit) : "");
  let meta = "";
  const m = node.metrics;
  if (m) {
    const calls = m.calls.ok + m.calls.app_error + m.calls.crashed + m.calls.failed;
    meta = `calls ${calls}`;
    if (m.fuel_consumed !== null) meta += ` · fuel ${fmtFuel(m.fuel_consumed)}`;
    if (m.memory_bytes !== null && node.status === "Running") meta += ` · mem ${fmtBytes(m.memory_bytes)}`;
    if (m.state_bytes) meta += ` · state ${fmtBytes(m.state_bytes)}`;
  }
  if (supervisor) meta = `${variant(supervisor.strategy)} · intensity ${supervisor.intensity_used}/${supervisor.max_restarts}`;
  set(f, "meta", (v) => { f.meta.textContent = v; }, meta);
}

function render(snapshot) {
  if (snapshot.root !== rootName) {
    rootName = snapshot.root;
    $("root-name").textContent = rootName;
    $("tree").replaceChildren();
    nodes.clear();
  }
  control = snapshot.control;
  const root = snapshot.supervisors.find((s) => s.path === snapshot.root);
  $("root-status").textContent = `root: ${variant(snapshot.root_status)}` +
    (root ? ` · ${variant(root.strategy)} · intensity ${root.intensity_used}/${root.max_restarts}` : "");
  const h = snapshot.host;
  $("host").textContent = h.live_instances === null ? "" :
    `instances ${h.live_instances} · pool slots ${h.pool_slots_used} used, ${h.pool_slots_free} free` +
    ` · components ${h.components_compiled} compiled, ${h.components_from_cache} from cache` +
    (snapshot.events_lost ? ` · ${snapshot.events_lost} events lost` : "");
  const supervisors = new Map(snapshot.supervisors.map((s) => [s.path, s]));
  const seen = new Set();
  const big = snapshot.nodes.length > 200;
  for (const node of snapshot.nodes) {
    seen.add(node.path);
    let f = nodes.get(node.path);
    if (!f) {
      f = makeNode(node);
      nodes.set(node.path, f);
      const parent = nodes.get(parentPath(node.path));
      (parent ? parent.children : $("tree")).append(f.li);
      // Large trees start with nested subtrees collapsed.
      if (big && node.kind === "supervisor" && parentPath(node.path) !== rootName) f.li.classList.add("collapsed");
    }
    updateNode(f, node, supervisors.get(node.path));
  }
  for (const [path, f] of nodes) {
    if (!seen.has(path)) { f.li.remove(); nodes.delete(path); }
  }
  $("empty").hidden = nodes.size > 0;
  document.body.dataset.loaded = "true";
  if (selected) showDetail(selected);
}

// ---- fetching: at once when asked, at most once per interval otherwise
let fetching = false, again = false, lastFetch = 0;
const MIN_INTERVAL = 500;
async function refresh() {
  if (fetching) { again = true; return; }
  const wait = lastFetch + MIN_INTERVAL - Date.now();
  if (wait > 0) { fetching = true; setTimeout(() => { fetching = false; refresh(); }, wait); return; }
  fetching = true;
  try {
    lastFetch = Date.now();
    const response = await fetch("/api/status", { cache: "no-store" });
    if (response.ok) render(await response.json());
  } catch (_) {
    // The host is away; the event stream's reconnection brings us back.
  } finally {
    fetching = false;
    if (again) { again = false; refresh(); }
  }
}

// ---- live events
let source = null, retry = 1000;
function setConn(state, text) { const c = $("conn"); c.dataset.state = state; c.textContent = text; }
function connect() {
  source = new EventSource("/api/events");
  source.addEventListener("open", () => { retry = 1000; setConn("live", "live"); refresh(); });
  source.addEventListener("supervisor", (e) => onEvent(JSON.parse(e.data)));
  source.addEventListener("lagged", () => refresh());
  source.addEventListener("error", () => {
    setConn("reconnecting", "disconnected: reconnecting…");
    // The browser retries by itself unless it gave up (an HTTP error): then we do.
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 10000);
    }
  });
}

function onEvent(event) {
  const f = nodes.get(event.path);
  if (f && variant(event.kind) === "ChildRestarted") {
    // Shown at once; the status fetch below brings the rest of the node.
    setRestarts(f, event.kind.ChildRestarted.restart_count);
    f.li.classList.remove("flash");
    void f.li.offsetWidth; // restart the animation
    f.li.classList.add("flash");
  }
  refresh();
}

// ---- the detail pane: a node's status, counters and last crash report
async function select(path) {
  if (selected && nodes.get(selected)) nodes.get(selected).li.classList.remove("selected");
  selected = path;
  const f = nodes.get(path);
  if (f) f.li.classList.add("selected");
  $("detail").hidden = false;
  await showDetail(path);
}

async function showDetail(path) {
  let detail;
  try {
    const response = await fetch("/api/nodes/" + path.split("/").map(encodeURIComponent).join("/"), { cache: "no-store" });
    detail = response.ok ? await response.json() : null;
  } catch (_) { detail = null; }
  if (selected !== path) return;
  const body = $("detail-body");
  body.replaceChildren();
  if (!detail) { body.append(el("h2", "", path), el("p", "error", "This node does not exist now.")); return; }
  const n = detail.node;
  body.append(el("h2", "", n.path));
  body.append(dl([
    ["kind", n.kind], ["status", fmtReason(n.status)], ["supervisor", detail.supervisor],
    ["restarts", n.restart_count], ["started", fmtTime(n.start_time)], ["last restart", fmtTime(n.last_restart)],
    ["health", n.health ? (n.health.failure ? `failing (${n.health.streak}): ${n.health.failure}` : "ok") + " at " + fmtTime(n.health.at) : "-"],
    ["circuit", n.circuit ? fmtReason(n.circuit) : "-"],
  ]));
  const m = n.metrics;
  if (m) {
    const avg = m.latency.count ? (1000 * m.latency.sum_seconds / m.latency.count).toFixed(2) + " ms" : "-";
    body.append(el("h3", "", "Calls and consumption"), dl([
      ["calls", `${m.calls.ok} ok, ${m.calls.app_error} app errors, ${m.calls.crashed} crashed, ${m.calls.failed} failed`],
      ["mean latency", avg], ["fuel consumed", fmtFuel(m.fuel_consumed) || "-"],
      ["memory", fmtBytes(m.memory_bytes) || "-"], ["state", fmtBytes(m.state_bytes) || "-"],
    ]));
  }
  body.append(crashReport(detail));
  if (control) body.append(controls(n.path));
}

function dl(rows) {
  const d = el("dl");
  for (const [k, v] of rows) d.append(el("dt", "", k), el("dd", "", String(v)));
  return d;
}

// The last crash report: the node's last exit, what the host knows about
// its last crash (the fault, the message it was handling, its WASM
// backtrace, its last output lines, the fuel and memory it had used) and
// what its supervisor did about each of its exits.
const REPORT_FIELDS = ["at", "fault", "message", "sequence", "message_hash", "fuel_used", "memory_bytes", "backtrace", "output"];
const ENTRY_FIELDS = ["agent_id", "path", "timestamp", "reason", "action", "crash"];
function crashReport(detail) {
  const box = el("section", "crash");
  box.append(el("h3", "", "Last crash report"));
  const n = detail.node;
  const crashes = detail.history.filter((e) => e.crash || (variant(e.reason) !== "Shutdown" && variant(e.reason) !== "Normal"));
  const last = crashes[crashes.length - 1];
  // The node's own last report outlives its history entry.
  const crash = detail.last_crash || (last && last.crash) || null;
  if (!n.last_exit && !last && !crash) { box.append(el("p", "", "It never exited.")); return box; }
  const report = el("div", "report");
  const rows = [
    ["last exit", n.last_exit ? fmtReason(n.last_exit) : "-"],
    ["at", crash ? new Date(crash.at).toLocaleString() : last ? new Date(last.timestamp).toLocaleString() : "-"],
  ];
  if (crash) rows.push(["fault", crash.fault]);
  if (last) rows.push(["reason", fmtReason(last.reason)], ["action", fmtReason(last.action)]);
  if (crash) {
    if (crash.sequence !== null && crash.sequence !== undefined) rows.push(["message no.", `${crash.sequence} of its incarnation`]);
    if (crash.message_hash) rows.push(["message hash", crash.message_hash]);
    rows.push(["fuel used", fmtFuel(crash.fuel_used) || "0"], ["memory", fmtBytes(crash.memory_bytes) || "-"]);
  }
  report.append(dl(rows));
  if (crash) {
    if (crash.message !== null && crash.message !== undefined) report.append(el("h4", "", "Message it was handling"), el("pre", "message", crash.message));
    if (crash.backtrace && crash.backtrace.length) {
      const ol = el("ol", "backtrace");
      for (const frame of crash.backtrace) ol.append(el("li", "", frame));
      const frames = crash.backtrace.length === 1 ? "1 frame" : `${crash.backtrace.length} frames`;
      report.append(el("h4", "", `WASM backtrace (${frames}, innermost first)`), ol);
    }
    if (crash.output && crash.output.length) report.append(el("h4", "", "Last output"), el("pre", "output", crash.output.join("\n")));
  }
  // Fields a newer host adds (to the report or the entry) are shown as they are.
  const extra = [];
  for (const [key, value] of Object.entries(crash || {})) if (!REPORT_FIELDS.includes(key)) extra.push([key, value]);
  for (const [key, value] of Object.entries(last || {})) if (!ENTRY_FIELDS.includes(key)) extra.push([key, value]);
  for (const [key, value] of extra) report.append(el("h4", "", key), el("pre", "", JSON.stringify(value, null, 2)));
  box.append(report);
  box.append(el("h3", "", `Restart history (${detail.history.length})`));
  const table = el("table");
  const head = el("tr");
  head.append(el("th", "", "time"), el("th", "", "reason"), el("th", "", "action"));
  table.append(head);
  for (const e of detail.history.slice().reverse()) {
    const tr = el("tr");
    const reason = el("td", "", fmtReason(e.reason));
    // The crash report's fault, and the message it was handling, on hover.
    if (e.crash) reason.title = e.crash.fault + (e.crash.message !== null && e.crash.message !== undefined ? `\nmessage: ${e.crash.message}` : "");
    tr.append(el("td", "", fmtTime(e.timestamp)), reason, el("td", "", fmtReason(e.action)));
    table.append(tr);
  }
  box.append(table);
  return box;
}

function controls(path) {
  const box = el("div", "controls");
  box.append(el("h3", "", "Management"));
  const out = el("p");
  for (const action of ["terminate", "restart"]) {
    const b = el("button", "", action);
    b.type = "button";
    b.addEventListener("click", async () => {
      const t = token();
      if (!t) { out.className = "error"; out.textContent = "No control token: open the URL the host printed (…/#token=…)."; return; }
      const response = await fetch(`/api/control/${action}/` + path.split("/").map(encodeURIComponent).join("/"), { method: "POST", headers: { [TOKEN_HEADER]: t } });
      const answer = await response.json().catch(() => ({}));
      out.className = response.ok ? "" : "error";
      out.textContent = response.ok ? `${action}: done` : answer.error || response.statusText;
      refresh();
    });
    box.append(b);
  }
  box.append(out);
  return box;
}

// ---- start
$("detail-close").addEventListener("click", () => {
  $("detail").hidden = true;
  if (selected && nodes.get(selected)) nodes.get(selected).li.classList.remove("selected");
  selected = null;
});
$("expand-all").addEventListener("click", () => { for (const f of nodes.values()) f.li.classList.remove("collapsed"); });
$("collapse-all").addEventListener("click", () => { for (const f of nodes.values()) if (f.li.classList.contains("supervisor")) f.li.classList.add("collapsed"); });
refresh();
connect();

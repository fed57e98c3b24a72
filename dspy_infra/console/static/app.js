// The dspy-infra console: plain JavaScript, no build step. Views are hash routes (shareable
// URLs); data comes from /api/v1; live updates come from one Server-Sent Events stream read
// with fetch (so the token goes in the Authorization header, never in a URL).
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "dspy-infra-token";
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const STATUS_OF_EVENT = {
  task_submitted: "pending",
  task_started: "running",
  task_retried: "pending",
  task_completed: "completed",
  task_failed: "failed",
  task_cancelled: "cancelled",
};
const FEED_SIZE = 200;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  feed: [], // newest first, at most FEED_SIZE
  lastEventId: "",
  stream: null, // AbortController of the event stream
  onEvent: null, // the current view's event handler
  renderSeq: 0,
};

// -- small helpers ---------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function time(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString() : "–";
}

function duration(ms) {
  if (!ms) return "–";
  return ms < 1000 ? `${ms.toFixed(0)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function badge(status) {
  return el("span", { class: `badge s-${status}`, text: status });
}

function json(value) {
  return el("pre", { class: "json", text: JSON.stringify(value, null, 2) });
}

function link(href, text) {
  return el("a", { href, text });
}

function taskHref(id) {
  return `#/tasks/${encodeURIComponent(id)}`;
}

// Calls at most once per `wait` ms, the last call winning (live refreshes without storms).
function throttle(fn, wait) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const delay = Math.max(0, last + wait - Date.now());
    timer = setTimeout(() => {
      timer = null;
      last = Date.now();
      fn();
    }, delay);
  };
}

// -- the API ------------------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const init = { method: options.method || "GET", headers, cache: "no-store" };
  if (init.method !== "GET") {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body || {});
  }
  const resp = await fetch(API + path, init);
  if (resp.status === 401) {
    showLogin(state.token ? "That token was refused." : "");
    throw new Unauthorized("token needed");
  }
  const doc = await resp.json();
  if (!resp.ok) throw new Error(doc.error || `HTTP ${resp.status}`);
  return doc;
}

// -- sign in ------------------------------------------------------------------------------------------

function showLogin(message) {
  stopEvents();
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("login").hidden = false;
  document.getElementById("token").focus();
}

function setupLogin() {
  document.getElementById("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token");
    state.token = input.value;
    input.value = "";
    sessionStorage.setItem(TOKEN_KEY, state.token);
    document.getElementById("login").hidden = true;
    document.getElementById("logout").hidden = false;
    startEvents();
    render();
  });
  const logout = document.getElementById("logout");
  logout.hidden = !state.token;
  logout.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    logout.hidden = true;
    showLogin("");
  });
}

// -- live events: one stream, read with fetch --------------------------------------------------------

function setLive(on, text) {
  const badgeEl = document.getElementById("live");
  badgeEl.className = `live ${on ? "on" : "off"}`;
  badgeEl.textContent = text;
}

function stopEvents() {
  if (state.stream) state.stream.abort();
  state.stream = null;
  setLive(false, "offline");
}

async function startEvents() {
  stopEvents();
  const controller = new AbortController();
  state.stream = controller;
  let retry = 2000;
  while (state.stream === controller) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (state.token) headers.Authorization = `Bearer ${state.token}`;
      if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
      const resp = await fetch(`${API}/events`, { headers, signal: controller.signal, cache: "no-store" });
      if (resp.status === 401) {
        showLogin("That token was refused.");
        return;
      }
      if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
      setLive(true, "live");
      retry = await readStream(resp.body, retry);
    } catch (err) {
      if (controller.signal.aborted) return;
    }
    if (state.stream !== controller) return;
    setLive(false, "reconnecting");
    await new Promise((resolve) => setTimeout(resolve, retry));
  }
}

async function readStream(body, retry) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let id = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return retry;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (data.length) dispatch(id, data.join("\n"));
        data = [];
      } else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      else if (line.startsWith("id:")) id = line.slice(3).trim();
      else if (line.startsWith("retry:")) retry = Number(line.slice(6)) || retry;
    }
  }
}

function dispatch(id, text) {
  let event;
  try {
    event = JSON.parse(text);
  } catch {
    return;
  }
  if (id) state.lastEventId = id;
  state.feed.unshift(event);
  if (state.feed.length > FEED_SIZE) state.feed.length = FEED_SIZE;
  if (event.type === "stream_reset" || event.type === "events_dropped") {
    render(); // what we show may have missed changes: read it again
    return;
  }
  if (state.onEvent) state.onEvent(event);
}

// -- views ---------------------------------------------------------------------------------------------

function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query || "") };
}

async function render() {
  const seq = ++state.renderSeq;
  const { parts, params } = parseHash();
  state.onEvent = null;
  const section = parts[0] || "overview";
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.nav === section || (section === "services" && a.dataset.nav === "overview"));
  }
  const view = document.getElementById("view");
  try {
    let node;
    if (section === "tasks" && parts[1]) node = await taskView(parts[1]);
    else if (section === "tasks") node = await tasksView(params);
    else if (section === "services" && parts[1]) node = await serviceView(parts[1]);
    else if (section === "runs" && parts[1]) node = await runView(parts[1]);
    else if (section === "runs") node = await runsView(params);
    else if (section === "events") node = eventsView();
    else node = await overviewView();
    if (seq !== state.renderSeq) return; // another view was asked for meanwhile
    view.replaceChildren(node);
    view.dataset.view = section;
    performance.mark(`rendered-${section}`);
  } catch (err) {
    if (seq !== state.renderSeq || err instanceof Unauthorized) return;
    view.replaceChildren(el("p", { class: "error", text: String(err.message || err) }));
  }
}

// Overview: services, queues, throughput and error rate, recent failures, recent events.

function sparkline(values, cls) {
  const w = 240;
  const h = 40;
  const max = Math.max(1e-9, ...values);
  const step = values.length > 1 ? w / (values.length - 1) : w;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(h - (v / max) * (h - 2) - 1).toFixed(1)}`);
  return svg(
    "svg",
    { class: `spark ${cls}`, viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" },
    values.length ? svg("polyline", { points: points.join(" ") }) : null,
  );
}

async function overviewView() {
  const doc = await api("/overview");
  const node = el("div", { class: "grid" });
  const interval = doc.throughput.interval;
  const pts = doc.throughput.points;
  const rate = pts.map((p) => p[1] / interval);
  const errors = pts.map((p) => (p[1] + p[2] > 0 ? p[2] / (p[1] + p[2]) : 0));
  // The figures: the last 30 seconds together (one interval alone is too noisy).
  const recent = pts.slice(-Math.max(1, Math.round(30 / interval)));
  const done = recent.reduce((n, p) => n + p[1], 0);
  const failed = recent.reduce((n, p) => n + p[2], 0);
  const lastRate = recent.length ? done / (recent.length * interval) : 0;
  const lastErr = done + failed > 0 ? failed / (done + failed) : 0;
  const running = doc.services.filter((s) => s.status !== "stopped");
  node.append(
    el(
      "section",
      { class: "card", id: "throughput" },
      el("h2", { text: "Throughput" }),
      el("p", {}, el("strong", { text: `${lastRate.toFixed(1)} tasks/s` }), " completed (last 30 s)"),
      pts.length < 2 ? el("p", { class: "muted small", text: `sampled every ${interval} s; the lines start after two samples` }) : null,
      sparkline(rate, "ok"),
      el("p", {}, el("strong", { text: `${(lastErr * 100).toFixed(1)} %` }), " of finished tasks failed"),
      sparkline(errors, "bad"),
    ),
    el(
      "section",
      { class: "card", id: "queues" },
      el("h2", { text: "Queues" }),
      el(
        "table",
        {},
        el("thead", {}, el("tr", {}, ["class", "waiting", "running", "limit"].map((h) => el("th", { text: h })))),
        el(
          "tbody",
          {},
          doc.queues.map((q) =>
            el(
              "tr",
              {},
              el("td", {}, link(`#/tasks?class=${encodeURIComponent(q.class)}`, q.class)),
              el("td", { text: q.depth }),
              el("td", { text: q.running }),
              el("td", { text: `${q.limit} (${q.min_limit}–${q.max_limit})` }),
            ),
          ),
        ),
      ),
    ),
    el(
      "section",
      { class: "card", id: "services" },
      el("h2", { text: `Services (${running.length} running of ${doc.services.length})` }),
      el(
        "table",
        {},
        el("thead", {}, el("tr", {}, ["service", "status", "url", "restarts"].map((h) => el("th", { text: h })))),
        el(
          "tbody",
          {},
          [...running, ...doc.services.filter((s) => s.status === "stopped")].map((s) =>
            el(
              "tr",
              { "data-service": s.name },
              el("td", {}, link(`#/services/${encodeURIComponent(s.name)}`, s.name)),
              el("td", {}, badge(s.status)),
              el("td", { class: "mono", text: s.url || "–" }),
              el("td", { text: s.restarts }),
            ),
          ),
        ),
      ),
    ),
    el(
      "section",
      { class: "card", id: "failures" },
      el("h2", { text: "Recent failures" }),
      doc.recent_failures.length
        ? el(
            "ul",
            { class: "plain" },
            doc.recent_failures.map((t) =>
              el("li", {}, link(taskHref(t.id), t.id), " ", el("span", { class: "muted", text: t.error })),
            ),
          )
        : el("p", { class: "muted", text: "none" }),
    ),
    el("section", { class: "card wide", id: "recent-events" }, el("h2", { text: "Recent events" }), feedList(10)),
  );
  const refresh = throttle(() => {
    if (parseHash().parts.length === 0) render();
  }, 2000);
  state.onEvent = () => refresh();
  return node;
}

// Tasks: filters, one page, live rows.

function taskRow(t) {
  const row = el(
    "tr",
    { "data-id": t.id, "data-history": t.status, "data-max": t.max_attempts || "" },
    el("td", { class: "mono" }, link(taskHref(t.id), t.id)),
    el("td", { text: t.class }),
    el("td", { class: "status" }, badge(t.status)),
    el("td", { class: "attempts", text: attemptsText(t.attempts, t.max_attempts) }),
    el("td", { text: time(t.submitted_at) }),
    el("td", { class: "duration", text: duration(t.duration_ms) }),
    el(
      "td",
      {},
      TERMINAL.has(t.status) ? null : el("button", { type: "button", class: "cancel", "data-cancel": t.id, text: "Cancel" }),
    ),
  );
  return row;
}

function attemptsText(attempts, max) {
  return max ? `${attempts} of ${max}` : String(attempts);
}

function setRowStatus(row, status, event) {
  row.querySelector(".status").replaceChildren(badge(status));
  row.dataset.history += `,${status}`;
  row.dataset.updatedAt = String(Date.now());
  row.dataset.eventTimestamp = String(event.timestamp);
  if (event.type === "task_started") {
    row.querySelector(".attempts").textContent = attemptsText(event.data.attempt, row.dataset.max);
  }
  if (event.data.duration_ms) row.querySelector(".duration").textContent = duration(Number(event.data.duration_ms));
  if (TERMINAL.has(status)) {
    const button = row.querySelector("button.cancel");
    if (button) button.remove();
  }
}

async function tasksView(params) {
  const query = new URLSearchParams();
  for (const key of ["status", "class", "workflow", "q", "offset"]) if (params.get(key)) query.set(key, params.get(key));
  query.set("limit", "50");
  const page = await api(`/tasks?${query}`);
  const form = el(
    "form",
    { class: "filters", id: "task-filters" },
    el(
      "select",
      { name: "status" },
      ["", "pending", "running", "completed", "failed", "cancelled"].map((s) =>
        el("option", { value: s, text: s || "any status", selected: params.get("status") === s && s ? "" : null }),
      ),
    ),
    el("input", { name: "class", placeholder: "class", value: params.get("class") || "" }),
    el("input", { name: "workflow", placeholder: "workflow", value: params.get("workflow") || "" }),
    el("input", { name: "q", placeholder: "id contains", value: params.get("q") || "" }),
    el("button", { type: "submit", text: "Filter" }),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) next.set(k, String(v));
    location.hash = `#/tasks?${next}`;
  });
  const tbody = el("tbody", {}, page.tasks.map(taskRow));
  tbody.addEventListener("click", async (ev) => {
    const id = ev.target.dataset && ev.target.dataset.cancel;
    if (!id) return;
    ev.target.disabled = true;
    try {
      const t = await api(`/tasks/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      const row = tbody.querySelector(`tr[data-id="${CSS.escape(id)}"]`);
      if (row && t.status !== row.querySelector(".badge").textContent) setRowStatus(row, t.status, { type: "", data: {}, timestamp: 0 });
    } catch (err) {
      ev.target.disabled = false;
    }
  });
  const offset = page.offset;
  const pager = el(
    "p",
    { class: "pager" },
    offset > 0 ? link(pageHref(params, Math.max(0, offset - page.limit)), "← newer") : null,
    ` newest first · page ${Math.floor(offset / page.limit) + 1} `,
    page.next_offset !== null ? link(pageHref(params, page.next_offset), "older →") : null,
    page.partial ? el("span", { class: "muted", text: " (filters looked at the newest tasks only)" }) : null,
  );
  const node = el(
    "div",
    {},
    el("h1", { text: "Tasks" }),
    form,
    el(
      "table",
      { id: "tasks", class: "tasks" },
      el("thead", {}, el("tr", {}, ["id", "class", "status", "attempts", "submitted", "duration", ""].map((h) => el("th", { text: h })))),
      tbody,
    ),
    pager,
  );
  const matches = (event) =>
    offset === 0 &&
    (!params.get("status") || params.get("status") === "pending") &&
    (!params.get("class") || params.get("class") === event.data.task_class) &&
    (!params.get("workflow") || params.get("workflow") === event.data.workflow_id) &&
    (!params.get("q") || event.resource_id.includes(params.get("q")));
  state.onEvent = (event) => {
    const status = STATUS_OF_EVENT[event.type];
    if (!status) return;
    const row = tbody.querySelector(`tr[data-id="${CSS.escape(event.resource_id)}"]`);
    if (row) {
      setRowStatus(row, status, event);
    } else if (event.type === "task_submitted" && matches(event)) {
      const fresh = taskRow({
        id: event.resource_id,
        class: event.data.task_class,
        status: "pending",
        attempts: 0,
        max_attempts: 0,
        submitted_at: event.timestamp,
        duration_ms: 0,
      });
      fresh.dataset.updatedAt = String(Date.now());
      tbody.prepend(fresh);
      while (tbody.rows.length > page.limit) tbody.lastElementChild.remove();
    }
  };
  return node;
}

function pageHref(params, offset) {
  const next = new URLSearchParams(params);
  if (offset) next.set("offset", String(offset));
  else next.delete("offset");
  return `#/tasks?${next}`;
}

// One task.

async function taskView(id) {
  const t = await api(`/tasks/${encodeURIComponent(id)}`);
  const node = el(
    "div",
    { id: "task-detail", "data-status": t.status },
    el("h1", {}, "Task ", el("span", { class: "mono", text: t.id }), " ", badge(t.status)),
    TERMINAL.has(t.status) ? null : el("button", { type: "button", id: "cancel-task", text: "Cancel" }),
    el(
      "dl",
      { class: "facts" },
      [
        ["class", link(`#/tasks?class=${encodeURIComponent(t.class)}`, t.class)],
        ["workflow", t.workflow_id ? link(`#/runs?workflow=${encodeURIComponent(t.workflow_id)}`, t.workflow_id) : "–"],
        ["priority", t.priority],
        ["attempts", `${t.attempts} of ${t.max_attempts}`],
        ["timeout", t.timeout === null ? "none" : `${t.timeout} s`],
        ["submitted", time(t.submitted_at)],
        ["started", time(t.started_at)],
        ["finished", time(t.completed_at)],
        ["duration", duration(t.duration_ms)],
      ].map(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]),
    ),
    t.error ? el("pre", { class: "error", text: t.error }) : null,
    el("h2", { text: "Attempts" }),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ["#", "started", "ended", "outcome", "error"].map((h) => el("th", { text: h })))),
      el(
        "tbody",
        {},
        t.attempt_history.map((a) =>
          el(
            "tr",
            {},
            el("td", { text: a.attempt }),
            el("td", { text: time(a.started_at) }),
            el("td", { text: time(a.ended_at) }),
            el("td", {}, badge(a.outcome)),
            el("td", { class: "muted", text: a.error }),
          ),
        ),
      ),
    ),
    el("div", { class: "two" }, el("div", {}, el("h2", { text: "Payload" }), json(t.payload)), el("div", {}, el("h2", { text: "Result" }), json(t.result))),
    el("h2", { text: t.log_truncated ? "Log (its end)" : "Log" }),
    el("pre", { class: "log", text: t.log || "(no output)" }),
  );
  const cancel = node.querySelector("#cancel-task");
  if (cancel) {
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      await api(`/tasks/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      render();
    });
  }
  const refresh = throttle(render, 500);
  state.onEvent = (event) => {
    if (event.resource_id === id) refresh();
  };
  return node;
}

// One service.

async function serviceView(name) {
  const s = await api(`/services/${encodeURIComponent(name)}`);
  const node = el(
    "div",
    { id: "service-detail" },
    el("h1", {}, "Service ", el("span", { class: "mono", text: s.name }), " ", badge(s.status)),
    el(
      "p",
      {},
      el("button", { type: "button", id: "restart-service", text: "Restart" }),
      " ",
      el("button", { type: "button", id: "stop-service", class: "danger", text: "Stop" }),
    ),
    el(
      "dl",
      { class: "facts" },
      [
        ["url", s.url || "–"],
        ["backend", s.backend],
        ["instance", s.instance_id || "–"],
        ["ports", Object.entries(s.ports).map(([c, h]) => `${c}→${h}`).join(", ") || "–"],
        ["health", Object.entries(s.health).map(([k, v]) => `${k}: ${v}`).join("; ") || "–"],
        ["restarts", s.restarts],
        ["started", time(s.started_at)],
        ["cpu", `${s.cpu_percent.toFixed(1)} %`],
        ["memory", `${(s.memory_bytes / 1048576).toFixed(1)} MiB`],
      ].map(([k, v]) => [el("dt", { text: k }), el("dd", { class: "mono", text: v })]),
    ),
    el("h2", { text: "Recent log" }),
    el("pre", { class: "log", text: s.logs.map((l) => `${l.stream === "stderr" ? "! " : ""}${l.message}`).join("\n") || "(no output)" }),
  );
  for (const [id, action] of [["restart-service", "restart"], ["stop-service", "stop"]]) {
    const button = node.querySelector(`#${id}`);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api(`/services/${encodeURIComponent(name)}/${action}`, { method: "POST" });
      } finally {
        render();
      }
    });
  }
  const refresh = throttle(render, 1000);
  state.onEvent = (event) => {
    if (event.resource_id === name && event.type.startsWith("service_")) refresh();
  };
  return node;
}

// Runs: a list, and one run drawn as its DAG.

async function runsView(params) {
  const query = new URLSearchParams({ limit: "50" });
  if (params.get("workflow")) query.set("workflow", params.get("workflow"));
  const [runs, workflows] = await Promise.all([api(`/runs?${query}`), api("/workflows")]);
  const node = el(
    "div",
    {},
    el("h1", { text: "Workflow runs" }),
    el("p", { class: "muted" }, `${workflows.workflows.length} workflow(s): `, workflows.workflows.map((w, i) => [i ? ", " : "", link(`#/runs?workflow=${encodeURIComponent(w.id)}`, w.name || w.id)])),
    el(
      "table",
      { id: "runs" },
      el("thead", {}, el("tr", {}, ["run", "workflow", "status", "steps", "started"].map((h) => el("th", { text: h })))),
      el(
        "tbody",
        {},
        runs.runs.map((r) =>
          el(
            "tr",
            { "data-run": r.run_id },
            el("td", { class: "mono" }, link(`#/runs/${encodeURIComponent(r.run_id)}`, r.run_id)),
            el("td", { text: r.workflow_id }),
            el("td", {}, badge(r.status)),
            el("td", { text: `${r.steps.filter((s) => s.status === "completed").length}/${r.steps.length}` }),
            el("td", { text: time(r.created_at) }),
          ),
        ),
      ),
    ),
  );
  const refresh = throttle(render, 1000);
  state.onEvent = (event) => {
    if (event.type.startsWith("workflow_")) refresh();
  };
  return node;
}

function dag(steps) {
  const byName = new Map(steps.map((s) => [s.name, s]));
  const depth = new Map();
  const depthOf = (name, seen = new Set()) => {
    if (depth.has(name)) return depth.get(name);
    if (seen.has(name)) return 0;
    seen.add(name);
    const deps = (byName.get(name) || { depends_on: [] }).depends_on.filter((d) => byName.has(d));
    const d = deps.length ? 1 + Math.max(...deps.map((x) => depthOf(x, seen))) : 0;
    depth.set(name, d);
    return d;
  };
  const layers = [];
  for (const s of steps) {
    const d = depthOf(s.name);
    (layers[d] = layers[d] || []).push(s);
  }
  const W = 150;
  const H = 46;
  const GX = 60;
  const GY = 22;
  const pos = new Map();
  layers.forEach((layer, x) => layer.forEach((s, y) => pos.set(s.name, { x: 10 + x * (W + GX), y: 10 + y * (H + GY) })));
  const width = 20 + layers.length * (W + GX) - GX;
  const height = 20 + Math.max(...layers.map((l) => l.length)) * (H + GY) - GY;
  const edges = [];
  for (const s of steps) {
    for (const dep of s.depends_on) {
      const a = pos.get(dep);
      const b = pos.get(s.name);
      if (!a || !b) continue;
      const x1 = a.x + W;
      const y1 = a.y + H / 2;
      const x2 = b.x;
      const y2 = b.y + H / 2;
      const mid = (x1 + x2) / 2;
      edges.push(svg("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2 - 4},${y2}` }));
    }
  }
  const nodes = steps.map((s) => {
    const p = pos.get(s.name);
    const g = svg(
      "g",
      { class: `step s-${s.status}`, "data-step": s.name, "data-status": s.status, transform: `translate(${p.x},${p.y})` },
      svg("rect", { width: W, height: H, rx: 6 }),
      svg("text", { x: 10, y: 19, class: "name" }, s.name.length > 18 ? `${s.name.slice(0, 17)}…` : s.name),
      svg("text", { x: 10, y: 36, class: "state" }, s.status),
      svg("title", {}, `${s.name}: ${s.status}${s.error ? ` — ${s.error}` : ""}`),
    );
    return s.task_id ? svg("a", { href: taskHref(s.task_id) }, g) : g;
  });
  return svg("svg", { class: "dag", id: "dag", viewBox: `0 0 ${width} ${height}`, width, height }, edges, nodes);
}

async function runView(runId) {
  const run = await api(`/runs/${encodeURIComponent(runId)}`);
  const node = el(
    "div",
    { id: "run-detail", "data-status": run.status },
    el("h1", {}, "Run ", el("span", { class: "mono", text: run.run_id }), " ", badge(run.status)),
    el("p", { class: "muted" }, "workflow ", link(`#/runs?workflow=${encodeURIComponent(run.workflow_id)}`, run.workflow_id), ` · started ${time(run.created_at)}`),
    run.error ? el("pre", { class: "error", text: run.error }) : null,
    el("div", { class: "dag-wrap" }, dag(run.steps)),
    el(
      "table",
      { id: "steps" },
      el("thead", {}, el("tr", {}, ["step", "status", "after", "started", "finished", "result"].map((h) => el("th", { text: h })))),
      el(
        "tbody",
        {},
        run.steps.map((s) =>
          el(
            "tr",
            { "data-step": s.name },
            el("td", {}, s.task_id ? link(taskHref(s.task_id), s.name) : s.name),
            el("td", {}, badge(s.status)),
            el("td", { text: s.depends_on.join(", ") || "–" }),
            el("td", { text: time(s.started_at) }),
            el("td", { text: time(s.completed_at) }),
            el("td", { class: "mono small", text: s.error || JSON.stringify(s.result) }),
          ),
        ),
      ),
    ),
    el("div", { class: "two" }, el("div", {}, el("h2", { text: "Input" }), json(run.input)), el("div", {}, el("h2", { text: "Output" }), json(run.output))),
  );
  const refresh = throttle(render, 500);
  state.onEvent = (event) => {
    if (event.resource_id === runId || event.resource_id.startsWith(`${runId}.`)) refresh();
  };
  return node;
}

// The live event feed.

function feedList(count) {
  const items = state.feed.slice(0, count);
  if (!items.length) return el("p", { class: "muted", text: "no events since this page opened" });
  return el(
    "ul",
    { class: "feed" },
    items.map((e) =>
      el(
        "li",
        { "data-type": e.type },
        el("span", { class: "muted", text: time(e.timestamp) }),
        " ",
        el("span", { class: `etype ${e.type.split("_").pop()}`, text: e.type }),
        " ",
        e.type.startsWith("task_") ? link(taskHref(e.resource_id), e.resource_id) : e.resource_id.startsWith("run-") ? link(`#/runs/${encodeURIComponent(e.resource_id)}`, e.resource_id) : e.resource_id,
        " ",
        el("span", { class: "muted small", text: Object.entries(e.data).map(([k, v]) => `${k}=${v}`).join(" ") }),
      ),
    ),
  );
}

function eventsView() {
  const holder = el("div", { id: "event-feed" }, feedList(FEED_SIZE));
  const node = el("div", {}, el("h1", { text: "Live events" }), el("p", { class: "muted", text: `the last ${FEED_SIZE} events since this page opened` }), holder);
  const refresh = throttle(() => holder.replaceChildren(feedList(FEED_SIZE)), 250);
  state.onEvent = () => refresh();
  return node;
}

// -- start -------------------------------------------------------------------------------------------

window.addEventListener("hashchange", render);
setupLogin();
render();
startEvents();

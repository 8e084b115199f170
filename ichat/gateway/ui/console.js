// iChat console: a client of the gateway's admin API, nothing more. Every request carries the
// admin key typed above (Authorization: Bearer); the key lives in this tab's sessionStorage only.
"use strict";
(() => {
  const KEY_STORE = "ichat.adminKey";
  const WORKERS_EVERY_MS = 1000;
  const METRICS_EVERY_MS = 2000;
  const RATE_WINDOW_MS = 30000;
  const LOG_LINES_KEPT = 2000;
  const $ = (selector) => document.querySelector(selector);
  let adminKey = sessionStorage.getItem(KEY_STORE) || "";

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    if (adminKey) headers.Authorization = "Bearer " + adminKey;
    return headers;
  }

  function refusal(status, message) {
    if (status === 401 || status === 403) {
      return `Refused (${status}): ${message} Enter the gateway's admin key above (auth.admin_key).`;
    }
    return `${status}: ${message}`;
  }

  async function api(method, path, body) {
    let resp;
    try {
      resp = await fetch(path, {
        method, cache: "no-store",
        headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }),
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, "Cannot reach the gateway: " + err.message);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: keep the text */ }
    if (!resp.ok) {
      const message = (data && data.error && data.error.message) || text || resp.statusText;
      throw new ApiError(resp.status, refusal(resp.status, message));
    }
    return data === null ? text : data;
  }

  function show(message, isError) {
    const el = $("#message");
    el.textContent = message || "";
    el.className = isError ? "error" : "";
    el.hidden = !message;
  }

  // -- workers and models (polled: the admin API is the source of truth) --------------------

  const WORKER_CELLS = ["worker", "state", "model", "backend", "address", "gpus", "load", "heartbeat", "restarts"];

  function gpus(view) {
    if (view.gpus && view.gpus.length) return view.gpus.map((g) => (g && g.index !== undefined ? g.index : g)).join(",");
    return view.gpu_ids && view.gpu_ids.length ? view.gpu_ids.join(",") : "-";
  }

  function load(view) {
    const l = view.load || {};
    if (l.running === undefined && l.waiting === undefined) return "-";
    return `${l.running || 0} run / ${l.waiting || 0} wait`;
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    return seconds < 60 ? `${seconds.toFixed(1)}s ago` : `${Math.round(seconds / 60)}m ago`;
  }

  function stateWord(view) {
    const managed = view.managed_state;
    return managed && managed !== "ready" && managed !== view.state ? managed : view.state;
  }

  function workerRow(id) {
    const tr = document.createElement("tr");
    tr.dataset.workerId = id;
    for (const name of WORKER_CELLS) {
      const td = document.createElement("td");
      td.className = name;
      tr.appendChild(td);
    }
    const actions = document.createElement("td");
    actions.className = "actions";
    for (const [action, label, cls] of [["logs", "Logs", ""], ["stop", "Stop", "danger"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.dataset.action = action;
      button.dataset.workerId = id;
      if (cls) button.className = cls;
      actions.appendChild(button);
    }
    tr.appendChild(actions);
    return tr;
  }

  function renderWorkers(views) {
    const tbody = $("#workers tbody");
    const rows = new Map([...tbody.querySelectorAll("tr")].map((tr) => [tr.dataset.workerId, tr]));
    for (const view of views) {
      let tr = rows.get(view.worker_id);
      if (!tr) { tr = workerRow(view.worker_id); tbody.appendChild(tr); }
      rows.delete(view.worker_id);
      const state = stateWord(view);
      const values = {
        worker: view.worker_id, model: view.model_name || "-", backend: view.backend || "-",
        address: view.address || "-", gpus: gpus(view), load: load(view), heartbeat: age(view.heartbeat_age_s),
        restarts: String(view.restarts || 0),
      };
      for (const [name, value] of Object.entries(values)) {
        const td = tr.querySelector("td." + name);
        if (td.textContent !== value) td.textContent = value;
      }
      const cell = tr.querySelector("td.state");
      let badge = cell.firstChild;
      if (!badge) { badge = document.createElement("span"); cell.appendChild(badge); }
      badge.className = "state " + state;
      badge.textContent = state;
      badge.title = view.message || (view.last_exit ? JSON.stringify(view.last_exit) : "");
      tr.dataset.state = state;
    }
    for (const tr of rows.values()) tr.remove();
    $("#workers-count").textContent = `(${views.length})`;
  }

  const metricsView = { snapshots: [], rates: {} };

  function renderModels(status) {
    const tbody = $("#models tbody");
    tbody.replaceChildren();
    for (const [name, counts] of Object.entries(status.models || {}).sort()) {
      const rate = metricsView.rates[name] || {};
      const tr = document.createElement("tr");
      tr.dataset.model = name;
      for (const [cls, value] of [
        ["model", name], ["replicas num", counts.replicas], ["routable num", counts.routable],
        ["rps num", rate.rps], ["eps num", rate.eps], ["avg num", rate.avg], ["p95 num", rate.p95],
      ]) {
        const td = document.createElement("td");
        td.className = cls;
        td.textContent = value === undefined ? "-" : String(value);
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
  }

  function uptime(seconds) {
    const s = Math.floor(seconds || 0);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
  }

  let lastStatus = { models: {} };

  async function refreshWorkers() {
    try {
      const [status, workers] = await Promise.all([api("GET", "/v1/admin/cluster/status"), api("GET", "/v1/admin/workers")]);
      lastStatus = status;
      renderWorkers(workers.data);
      renderModels(status);
      $("#gateway-info").textContent = `${location.host} · up ${uptime(status.gateway.uptime_s)} · ${status.gateway.reloads} reload(s)`;
      document.body.dataset.connected = "yes";
      if ($("#message").dataset.source === "poll") { show(""); $("#message").dataset.source = ""; }
    } catch (err) {
      document.body.dataset.connected = "no";
      show(err.message, true);
      $("#message").dataset.source = "poll";
    }
  }

  // -- request rate and latency, from the gateway's Prometheus counters ----------------------

  function parseMetrics(text) {
    const byModel = {};
    const model = (labels) => {
      const name = labels.model;
      return byModel[name] || (byModel[name] = { count: 0, errors: 0, sum: 0, n: 0, buckets: {} });
    };
    for (const line of text.split("\n")) {
      if (!line.startsWith("ichat_gateway_request")) continue;
      const m = /^(\w+)\{(.*)\}\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = {};
      for (const pair of m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
      const value = Number(m[3]);
      if (m[1] === "ichat_gateway_requests_total") {
        const entry = model(labels);
        entry.count += value;
        if (Number(labels.status) >= 400) entry.errors += value;
      } else if (m[1] === "ichat_gateway_request_duration_seconds_sum") model(labels).sum += value;
      else if (m[1] === "ichat_gateway_request_duration_seconds_count") model(labels).n += value;
      else if (m[1] === "ichat_gateway_request_duration_seconds_bucket") model(labels).buckets[labels.le] = value;
    }
    return byModel;
  }

  function seconds(s) {
    return s >= 1 ? `${s.toFixed(2)} s` : `${(s * 1000).toFixed(1)} ms`;
  }

  function computeRates(prev, cur, dt) {
    const rates = {};
    for (const [name, now] of Object.entries(cur)) {
      const before = prev[name] || { count: 0, errors: 0, sum: 0, n: 0, buckets: {} };
      const done = now.n - before.n;
      const rate = { rps: ((now.count - before.count) / dt).toFixed(2), eps: ((now.errors - before.errors) / dt).toFixed(2) };
      if (done > 0) {
        rate.avg = seconds((now.sum - before.sum) / done);
        const bounds = Object.keys(now.buckets).sort((a, b) => Number(a) - Number(b));
        for (const le of bounds) {
          if (now.buckets[le] - (before.buckets[le] || 0) >= 0.95 * done) {
            rate.p95 = le === "+Inf" ? "> max bucket" : "≤ " + seconds(Number(le));
            break;
          }
        }
      }
      rates[name] = rate;
    }
    return rates;
  }

  async function refreshMetrics() {
    try {
      const text = await api("GET", "/metrics");
      const now = performance.now();
      const snapshot = { at: now, models: parseMetrics(typeof text === "string" ? text : "") };
      // rates over a sliding window: the oldest snapshot kept is at most RATE_WINDOW_MS old
      metricsView.snapshots = metricsView.snapshots.filter((s) => now - s.at <= RATE_WINDOW_MS);
      const oldest = metricsView.snapshots[0];
      if (oldest && now > oldest.at) metricsView.rates = computeRates(oldest.models, snapshot.models, (now - oldest.at) / 1000);
      metricsView.snapshots.push(snapshot);
      renderModels(lastStatus);
    } catch (_) { /* the poll above reports refusals; metrics just stay blank */ }
  }

  // -- a worker's log, followed over SSE with fetch (EventSource cannot send the key) --------

  const logs = { worker: null, abort: null, lastId: null, epoch: null };

  function appendLog(line) {
    const pre = $("#log-lines");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    const span = document.createElement("span");
    span.className = line.stream || "";
    span.textContent = line.line + "\n";
    pre.appendChild(span);
    while (pre.childNodes.length > LOG_LINES_KEPT) pre.removeChild(pre.firstChild);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function parseSSE(buffer, onEvent) {
    // returns what is left of the buffer after the complete events in it
    const blocks = buffer.split(/\r?\n\r?\n/);
    const rest = blocks.pop();
    for (const block of blocks) {
      const event = { event: "message", data: [], id: null };
      for (const line of block.split(/\r?\n/)) {
        if (!line || line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") event.data.push(value);
        else if (field === "event") event.event = value;
        else if (field === "id") event.id = value;
      }
      if (event.data.length) onEvent(event.event, event.data.join("\n"), event.id);
    }
    return rest;
  }

  async function followOnce(worker, signal) {
    const headers = authHeaders(logs.lastId !== null ? { "Last-Event-ID": String(logs.lastId) } : {});
    const query = `?source=${encodeURIComponent($("#logs-source").value)}` + (logs.lastId !== null ? "" : "&tail=200");
    const resp = await fetch(`/v1/logs/stream/${encodeURIComponent(worker)}${query}`, { headers, signal, cache: "no-store" });
    if (!resp.ok) {
      let message = resp.statusText;
      try { message = (await resp.json()).error.message; } catch (_) { /* keep the status text */ }
      throw new ApiError(resp.status, refusal(resp.status, message));
    }
    const epoch = resp.headers.get("X-Log-Epoch");
    if (epoch && logs.epoch && epoch !== logs.epoch) {
      logs.epoch = epoch; logs.lastId = null;
      appendLog({ stream: "gateway", line: "-- the gateway restarted; its log ids started over --" });
      return;
    }
    logs.epoch = epoch || logs.epoch;
    $("#logs-state").textContent = "following";
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = parseSSE(buffer + decoder.decode(value, { stream: true }), (event, data) => {
        if (event === "log") {
          const line = JSON.parse(data);
          if (logs.lastId !== null && line.id <= logs.lastId) return;
          logs.lastId = line.id;
          appendLog(line);
        } else if (event === "dropped") {
          appendLog({ stream: "gateway", line: `-- lines dropped (this view fell behind): ${data} --` });
        }
      });
    }
  }

  async function followLogs(worker) {
    if (logs.abort) logs.abort.abort();
    const controller = new AbortController();
    Object.assign(logs, { worker, abort: controller, lastId: null, epoch: null });
    $("#log-lines").replaceChildren();
    $("#log-lines").dataset.source = $("#logs-source").value;
    $("#logs-worker").textContent = worker;
    for (const tr of document.querySelectorAll("#workers tbody tr")) tr.classList.toggle("selected", tr.dataset.workerId === worker);
    let delay = 250;
    while (!controller.signal.aborted) {
      try {
        await followOnce(worker, controller.signal);
        delay = 250;
      } catch (err) {
        if (controller.signal.aborted) return;
        if (err instanceof ApiError && err.status >= 400) {
          $("#logs-state").textContent = "stopped";
          show(err.message, true);
          return;
        }
      }
      if (controller.signal.aborted) return;
      $("#logs-state").textContent = "reconnecting…";
      await new Promise((resolve) => setTimeout(resolve, delay * (0.5 + Math.random() / 2)));
      delay = Math.min(delay * 2, 5000);
    }
  }

  // -- actions, each behind a confirmation ---------------------------------------------------

  function engineFlags(text) {
    // "--max-model-len 2048 --enforce-eager" -> {max_model_len: "2048", enforce_eager: true}
    const words = text.trim() ? text.trim().split(/\s+/) : [];
    const flags = {};
    for (let i = 0; i < words.length; i++) {
      const word = words[i];
      if (!word.startsWith("--")) throw new Error(`expected an engine flag (--name [value]), got "${word}"`);
      let [name, value] = word.slice(2).split(/=(.*)/s);
      if (value === undefined) value = i + 1 < words.length && !words[i + 1].startsWith("--") ? words[++i] : true;
      flags[name.replace(/-/g, "_")] = value;
    }
    return flags;
  }

  async function act(question, method, path, body, done) {
    if (!window.confirm(question)) return;
    try {
      const answer = await api(method, path, body);
      show(done(answer), false);
      refreshWorkers();
    } catch (err) {
      show(err.message, true);
    }
  }

  function onLaunch(event) {
    event.preventDefault();
    const form = event.target;
    let spec;
    try {
      spec = engineFlags(form.flags.value);
    } catch (err) { show(err.message, true); return; }
    spec.model_name = form.model_name.value.trim();
    spec.model_path = form.model_path.value.trim();
    spec.port = Number(form.port.value);
    if (form.backend.value.trim()) spec.backend = form.backend.value.trim();
    if (form.gpu_ids.value.trim()) spec.gpu_ids = form.gpu_ids.value.split(",").map((x) => Number(x.trim()));
    act(`Launch ${spec.model_name} (${spec.model_path}) on port ${spec.port}?`, "POST", "/v1/admin/workers/launch", spec,
      (a) => `Launched ${a.worker_id}; its state shows in the table.`);
  }

  function onWorkerButton(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const worker = button.dataset.workerId;
    if (button.dataset.action === "logs") followLogs(worker);
    else if (button.dataset.action === "stop") {
      act(`Stop worker ${worker}?`, "DELETE", `/v1/admin/workers/${encodeURIComponent(worker)}`, undefined,
        (a) => `${a.worker_id}: ${a.message}`);
    }
  }

  function onReload() {
    act("Reload the gateway's config file now?", "POST", "/v1/admin/config/reload", undefined,
      (a) => `Config ${a.status}: started [${a.started}], stopped [${a.stopped}], restarted [${a.restarted}].`);
  }

  function onKey(event) {
    event.preventDefault();
    adminKey = $("#admin-key").value;
    if (adminKey) sessionStorage.setItem(KEY_STORE, adminKey); else sessionStorage.removeItem(KEY_STORE);
    show("");
    refreshWorkers();
    refreshMetrics();
    if (logs.worker) followLogs(logs.worker);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#admin-key").value = adminKey;
    $("#key-form").addEventListener("submit", onKey);
    $("#launch-form").addEventListener("submit", onLaunch);
    $("#workers tbody").addEventListener("click", onWorkerButton);
    $("#reload").addEventListener("click", onReload);
    $("#logs-source").addEventListener("change", () => { if (logs.worker) followLogs(logs.worker); });
    refreshWorkers();
    refreshMetrics();
    setInterval(refreshWorkers, WORKERS_EVERY_MS);
    setInterval(refreshMetrics, METRICS_EVERY_MS);
  });
})();

/* Flywheel dashboard: one read model (GET /api/state), kept current by Server-Sent Events
 * (GET /api/stream: each message holds only the sections that changed, each whole), merged
 * into `state`; only the panels that read a changed section are drawn again. Charts are
 * Chart.js 4 (vendored, static/vendor/), created once and updated in place.
 *
 * Each panel is a <section id="panel-..."> carrying data-* attributes that say what it shows
 * (counts, the champion's sha256, the points plotted): tests/services/dashboard/test_browser.py
 * reads them.
 */
(() => {
  "use strict";

  // ---------------------------------------------------------------- state

  const state = {};
  // Server time minus client time, so ages are right whatever the browser's clock says.
  let clockSkewMs = 0;
  let lineageKey; // undefined until the first render: null means "nothing deployed"
  let lineageRetry = null;

  // Which panel reads which sections of the state.
  const PANELS = [
    { id: "panel-services", sections: ["services"], render: renderServices },
    { id: "panel-queue", sections: ["queue"], render: renderQueue },
    { id: "panel-training", sections: ["training", "runs", "trace_url"], render: renderTraining },
    { id: "panel-loss", sections: ["loss"], render: renderLoss },
    { id: "panel-accuracy", sections: ["scores", "markers"], render: renderAccuracy },
    { id: "panel-champion", sections: ["champion", "champions", "decisions", "deployment", "trace_url"], render: renderChampion },
    { id: "panel-curriculum", sections: ["curriculum"], render: renderCurriculum },
    { id: "panel-lineage", sections: ["champion", "trace_url"], render: renderLineage },
    { id: "panel-datasets", sections: ["datasets", "trace_url"], render: renderDatasets },
    { id: "panel-deadletters", sections: ["dead_letters"], render: renderDeadLetters },
    { id: "header", sections: ["champion", "caught_up", "version", "now"], render: renderHeader },
  ];

  const QUEUE_ORDER = ["gatekeeper", "trainer-high", "trainer-normal", "trainer-low"];
  const SERVICE_ORDER = ["gatekeeper", "trainer", "evaluator", "deployer", "inference", "curriculum", "dashboard"];
  const PALETTE = ["#2f6fde", "#e8793a", "#1f9d55", "#9b51e0", "#d64545", "#0e9aa7", "#b7791f", "#5c6bc0", "#c2185b", "#607d8b"];
  const MARKER_COLOURS = { promotion: "#1f9d55", rollback: "#d64545", level_change: "#9b51e0", deploy_failed: "#e8793a" };

  // ---------------------------------------------------------------- DOM helpers

  /** h("td", {class: "num", "data-x": 1}, "text", child, [more]) */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key === "style") el.setAttribute("style", value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(el, child);
      else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function panelBody(id) {
    return document.querySelector(`#${id} .body`);
  }

  function fill(el, ...children) {
    el.replaceChildren();
    append(el, children);
  }

  function setData(el, values) {
    for (const [key, value] of Object.entries(values)) el.dataset[key] = value === null || value === undefined ? "" : String(value);
  }

  function empty(text) {
    return h("div", { class: "empty" }, text);
  }

  // ---------------------------------------------------------------- formatting

  const DASH = "\u2014";

  function num(value, digits = 3) {
    if (value === null || value === undefined || Number.isNaN(value)) return DASH;
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
    return value.toFixed(digits);
  }

  function pct(value, digits = 1) {
    if (value === null || value === undefined || Number.isNaN(value)) return DASH;
    return `${(value * 100).toFixed(digits)}%`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return DASH;
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    const hours = Math.floor(m / 60);
    if (hours < 48) return `${hours}h ${String(m % 60).padStart(2, "0")}m`;
    return `${Math.floor(hours / 24)}d ${hours % 24}h`;
  }

  function ms(iso) {
    const t = Date.parse(iso);
    return Number.isNaN(t) ? null : t;
  }

  function clock(t, withSeconds = true) {
    const d = new Date(t);
    const opts = { hour: "2-digit", minute: "2-digit", hour12: false };
    if (withSeconds) opts.second = "2-digit";
    const today = new Date(Date.now() + clockSkewMs).toDateString() === d.toDateString();
    const time = d.toLocaleTimeString("en-GB", opts);
    return today ? time : `${d.toLocaleDateString("en-CA")} ${time}`;
  }

  function ago(t) {
    const seconds = (Date.now() + clockSkewMs - t) / 1000;
    if (seconds < 5) return "just now";
    return `${duration(seconds)} ago`;
  }

  /** A <time> that says how long ago; its title says when. Refreshed by tickTimes(). */
  function timeEl(iso) {
    const t = ms(iso);
    if (t === null) return h("span", { class: "muted" }, iso ? String(iso) : DASH);
    return h("time", { datetime: iso, class: "rel", title: `${clock(t)} (${iso})` }, ago(t));
  }

  function tickTimes() {
    for (const el of document.querySelectorAll("time.rel")) {
      const t = ms(el.getAttribute("datetime"));
      if (t !== null) el.textContent = ago(t);
    }
  }

  function short(text, n = 12) {
    if (!text) return DASH;
    return text.length > n ? text.slice(0, n) : text;
  }

  function code(text, n = 12) {
    return h("code", { title: text || "" }, short(text, n));
  }

  function traceHref(traceId) {
    const template = state.trace_url || "/traces/{trace_id}";
    return template.split("{trace_id}").join(encodeURIComponent(traceId));
  }

  function traceLink(traceId, label) {
    if (!traceId) return h("span", { class: "muted" }, DASH);
    return h("a", { href: traceHref(traceId), target: "_blank", rel: "noopener", class: "trace-link", title: `trace ${traceId}` },
      label || `trace ${traceId.slice(0, 8)}`);
  }

  function badge(text, kind) {
    return h("span", { class: `badge ${kind || ""}` }, text);
  }

  const STATE_KIND = {
    submitted: "", accepted: "ok", rejected: "bad", training: "info", trained: "ok", failed: "bad",
    running: "info", retrying: "warn", finished: "ok", paused: "warn", stopping: "warn",
    // The deployer's decisions (libs/common/records.py DeployDecision.outcome) and deployments.
    promoted: "ok", kept: "", refused: "warn", rescored: "info", rolled_back: "bad", deploy_failed: "bad",
    staged: "info", served: "ok",
  };

  function stateBadge(value) {
    const kind = STATE_KIND[value] ?? (/fail|error|reject/.test(value || "") ? "bad" : /promot|deploy|accept/.test(value || "") ? "ok" : "");
    return badge(value || DASH, kind);
  }

  function table(headers, rows, cls) {
    return h("table", { class: cls || "" },
      h("thead", {}, h("tr", {}, headers.map(([label, thCls]) => h("th", { class: thCls || "" }, label)))),
      h("tbody", {}, rows));
  }

  // ---------------------------------------------------------------- header

  function renderHeader() {
    setData(document.body, { eventVersion: state.version ?? "" });
    const champion = state.champion;
    const served = document.getElementById("served");
    const test = champion && champion.test;
    fill(served, champion
      ? ["serving ", h("code", { title: champion.checkpoint_sha256 }, short(champion.checkpoint_sha256, 12)),
        test ? ` \u00b7 sealed test ${pct(test.exact_match)} [${pct(test.low)}, ${pct(test.high)}]` : " \u00b7 not yet tested"]
      : "no model deployed yet");
    document.getElementById("replay").hidden = state.caught_up !== false;
    const version = document.getElementById("version");
    fill(version, `read model v${state.version ?? DASH}`, state.now ? ` \u00b7 server time ${clock(ms(state.now))}` : "");
    document.body.dataset.caughtUp = String(state.caught_up === true);
    document.body.dataset.version = String(state.version ?? "");
  }

  // ---------------------------------------------------------------- services

  function renderServices() {
    const panel = document.getElementById("panel-services");
    const services = state.services || {};
    const names = Object.keys(services).sort((a, b) => rank(SERVICE_ORDER, a) - rank(SERVICE_ORDER, b) || a.localeCompare(b));
    const ok = names.filter((n) => services[n].ok).length;
    setData(panel, { total: names.length, ok, down: names.length - ok });
    if (!names.length) return fill(panelBody("panel-services"), empty("No service checked yet"));
    fill(panelBody("panel-services"), h("ul", { class: "services" }, names.map((name) => {
      const s = services[name];
      const detail = [s.status, s.detail].filter(Boolean).join(": ");
      return h("li", { "data-service": name, "data-ok": String(!!s.ok) },
        h("span", { class: `health-dot ${s.ok ? "ok" : "bad"}`, title: s.ok ? "healthy" : "unhealthy" }),
        h("span", { class: "name" }, s.url ? h("a", { href: `${s.url.replace(/\/$/, "")}/health`, target: "_blank", rel: "noopener" }, name) : name),
        h("span", { class: "status", title: [detail, s.url, s.checked && `checked ${s.checked}`].filter(Boolean).join("\n") }, detail || (s.ok ? "ok" : "down")),
        badge(s.ok ? "up" : "down", s.ok ? "ok" : "bad"));
    })));
  }

  function rank(order, name) {
    const i = order.indexOf(name);
    return i === -1 ? order.length : i;
  }

  // ---------------------------------------------------------------- queue

  function renderQueue() {
    const panel = document.getElementById("panel-queue");
    const queue = state.queue || {};
    const names = Object.keys(queue).sort((a, b) => rank(QUEUE_ORDER, a) - rank(QUEUE_ORDER, b) || a.localeCompare(b));
    const totals = names.map((n) => (queue[n].waiting || 0) + (queue[n].in_progress || 0));
    const scale = Math.max(4, ...totals);
    setData(panel, {
      waiting: names.reduce((sum, n) => sum + (queue[n].waiting || 0), 0),
      inProgress: names.reduce((sum, n) => sum + (queue[n].in_progress || 0), 0),
    });
    if (!names.length) return fill(panelBody("panel-queue"), empty("No queue information yet"));
    fill(panelBody("panel-queue"),
      names.map((name) => {
        const q = queue[name];
        const label = name.startsWith("trainer-") ? `train \u00b7 ${name.slice(8)}` : name === "gatekeeper" ? "validate" : name;
        return h("div", { class: "queue-row", "data-queue": name, "data-waiting": q.waiting || 0, "data-in-progress": q.in_progress || 0 },
          h("span", { class: "name", title: `consumer ${name}` }, label),
          h("div", { class: "queue-bar" },
            h("div", { class: "inprog", style: `width:${(100 * (q.in_progress || 0)) / scale}%` }),
            h("div", { class: "waiting", style: `width:${(100 * (q.waiting || 0)) / scale}%` })),
          h("span", { class: "counts" }, h("b", {}, String(q.waiting || 0)), " waiting", h("br"), `${q.in_progress || 0} in progress`));
      }),
      h("div", { class: "legend" },
        h("span", {}, h("i", { style: "background:var(--accent)" }), "in progress"),
        h("span", {}, h("i", { style: "background:#9dbcf2" }), "waiting")));
  }

  // ---------------------------------------------------------------- training

  function stat(label, value, title) {
    return h("div", { class: "stat", title: title || "" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
  }

  function renderTraining() {
    const panel = document.getElementById("panel-training");
    const t = state.training;
    const runs = state.runs || [];
    setData(panel, {
      runs: runs.length,
      runId: t ? t.run_id : "",
      state: t ? t.state : "idle",
      step: t ? t.step : "",
      totalSteps: t ? t.total_steps : "",
      finishedRuns: runs.filter((r) => r.state === "finished").length,
    });
    const parts = [];
    if (t) {
      const fraction = t.total_steps ? Math.min(1, t.step / t.total_steps) : 0;
      parts.push(
        h("div", { class: "run-head" },
          h("span", { class: "title" }, t.dataset_name || t.dataset_id || "dataset"),
          stateBadge(t.state),
          h("span", { class: "muted" }, "run ", code(t.run_id, 40)),
          h("span", { class: "muted" }, "started ", timeEl(t.started)),
          traceLink(t.trace_id)),
        h("div", { class: "progress-label" },
          h("span", {}, "step ", h("b", { class: "step" }, num(t.step)), ` / ${num(t.total_steps)}`),
          h("span", {}, h("b", {}, `${(100 * fraction).toFixed(1)}%`))),
        h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": t.total_steps, "aria-valuenow": t.step },
          h("div", { class: "fill", style: `width:${(100 * fraction).toFixed(2)}%` })),
        h("div", { class: "stats" },
          stat("loss", num(t.loss, 4)),
          stat("learning rate", t.learning_rate === null || t.learning_rate === undefined ? DASH : t.learning_rate.toExponential(2)),
          stat("tokens / s", t.tokens_per_second === null || t.tokens_per_second === undefined ? DASH : Math.round(t.tokens_per_second).toLocaleString("en-US")),
          stat("ETA", t.eta_s === null || t.eta_s === undefined ? DASH : duration(t.eta_s)),
          stat("epoch", num(t.epoch, 2)),
          stat("grad norm", num(t.grad_norm, 3)),
          stat("val loss", num(t.val_loss, 4), "on the dataset's held-out slice, never trained on"),
          stat("train/val gap", num(t.train_val_gap, 3), "val loss - train loss: < 0.3 generalising, > 0.5 overfitting"),
          stat("global step", num(t.global_step), "steps over every run so far")));
    } else {
      parts.push(h("div", { class: "run-head" }, badge("idle", ""), h("span", { class: "muted" },
        runs.length ? "nothing is training; the latest runs are below" : "nothing has trained yet: drop a dataset into the inbox")));
    }
    if (runs.length) {
      const recent = runs.slice(-5).reverse();
      parts.push(h("div", { class: "subhead" }, `Runs (${runs.length})`),
        table([["run"], ["dataset"], ["state"], ["steps", "num"], ["final loss", "num"], ["started"], ["took"], [""]],
          recent.map((r) => h("tr", { "data-run-id": r.run_id, "data-state": r.state },
            h("td", { class: "run-id" }, code(r.run_id, 40)),
            h("td", {}, r.dataset_name || short(r.dataset_id)),
            h("td", {}, stateBadge(r.state), r.error ? h("div", { class: "error-text small", title: r.error }, short(r.error, 60)) : null),
            h("td", { class: "num" }, `${num(r.total_steps)}`),
            h("td", { class: "num" }, num(r.final_loss, 4)),
            h("td", {}, timeEl(r.started)),
            h("td", {}, r.finished && ms(r.started) !== null && ms(r.finished) !== null ? duration((ms(r.finished) - ms(r.started)) / 1000) : DASH),
            h("td", {}, traceLink(r.trace_id, "trace")))),
          "runs-table"));
    }
    fill(panelBody("panel-training"), parts);
  }

  // ---------------------------------------------------------------- charts

  const charts = {};
  const chartsAvailable = typeof window.Chart === "function";

  function timeTick(value, step) {
    return clock(value, step < 60 * 1000);
  }

  function makeCharts() {
    if (!chartsAvailable) {
      for (const id of ["chart-loss", "chart-accuracy"]) {
        document.querySelector(`#${id} .chart-empty`).textContent = "Chart.js did not load (static/vendor/chart.umd.min.js)";
      }
      return;
    }
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.font.size = 11;
    Chart.defaults.color = "#6b7486";
    Chart.defaults.borderColor = "#e8ebf1";
    Chart.defaults.animation = false;

    charts.loss = new Chart(document.querySelector("#chart-loss canvas"), {
      type: "line",
      data: {
        datasets: [
          { label: "train loss", data: [], borderColor: "#2f6fde", backgroundColor: "#2f6fde", borderWidth: 1.5, pointRadius: 0, tension: 0.15 },
          { label: "validation loss", data: [], borderColor: "#e8793a", backgroundColor: "#e8793a", borderWidth: 2, pointRadius: 3, pointHoverRadius: 5 },
        ],
      },
      options: {
        responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
        interaction: { mode: "nearest", intersect: false, axis: "x" },
        scales: {
          x: { type: "linear", title: { display: true, text: "global step" }, ticks: { precision: 0 } },
          y: { type: "linear", title: { display: true, text: "loss" } },
        },
        plugins: {
          legend: { position: "top", align: "end", labels: { boxWidth: 12, boxHeight: 2 } },
          tooltip: { callbacks: { label: (ctx) => `${ctx.dataset.label}: ${num(ctx.parsed.y, 4)} (run ${short(ctx.raw.run_id, 10)})`, title: (items) => items.length ? `step ${num(items[0].parsed.x)}` : "" } },
          decimation: { enabled: true, algorithm: "lttb", samples: 800 },
        },
      },
    });

    charts.accuracy = new Chart(document.querySelector("#chart-accuracy canvas"), {
      type: "line",
      data: { datasets: [] },
      options: {
        responsive: true, maintainAspectRatio: false, parsing: false,
        interaction: { mode: "nearest", intersect: false, axis: "x" },
        scales: {
          x: { type: "linear", title: { display: true, text: "time" }, ticks: { maxRotation: 0, autoSkipPadding: 16, callback: (v) => timeTick(v, accuracyStep) } },
          y: { type: "linear", min: 0, max: 1, title: { display: true, text: "accuracy" }, ticks: { callback: (v) => `${Math.round(v * 100)}%` } },
        },
        plugins: {
          legend: { position: "top", align: "end", labels: { boxWidth: 12, boxHeight: 2, filter: (item, data) => !data.datasets[item.datasetIndex].band } },
          tooltip: {
            filter: (item) => !item.dataset.band,
            callbacks: {
              title: (items) => items.length ? clock(items[0].parsed.x) : "",
              label: (ctx) => {
                const r = ctx.raw;
                const counts = r.total ? ` ${r.correct}/${r.total}` : "";
                return `${ctx.dataset.label}: ${pct(r.y)} [${pct(r.low)}, ${pct(r.high)}]${counts}`;
              },
            },
          },
          annotation: { annotations: {} },
        },
      },
    });
  }

  let accuracyStep = 60 * 1000;
  const TIME_STEPS = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800]
    .map((s) => s * 1000);

  function renderLoss() {
    const container = document.getElementById("chart-loss");
    const loss = state.loss || { train: [], val: [] };
    const train = (loss.train || []).filter((p) => p.y !== null && p.y !== undefined).map((p) => ({ x: p.x, y: p.y, run_id: p.run_id }));
    const val = (loss.val || []).filter((p) => p.y !== null && p.y !== undefined).map((p) => ({ x: p.x, y: p.y, run_id: p.run_id }));
    train.sort((a, b) => a.x - b.x);
    val.sort((a, b) => a.x - b.x);
    setData(container, { points: train.length + val.length, trainPoints: train.length, valPoints: val.length });
    if (charts.loss) {
      charts.loss.data.datasets[0].data = train;
      charts.loss.data.datasets[1].data = val;
      charts.loss.update("none");
    }
    // The latest gap: the latest validation loss against the training loss around that step
    // (the mean of the last few train points at or before it, so one noisy batch does not decide).
    const meta = document.querySelector("#panel-loss .chart-meta");
    const items = [];
    const lastTrain = train[train.length - 1];
    if (lastTrain) items.push(h("span", {}, "train ", h("b", {}, num(lastTrain.y, 4)), ` at step ${num(lastTrain.x)}`));
    const lastVal = val[val.length - 1];
    let gap = null;
    if (lastVal) {
      items.push(h("span", {}, "validation ", h("b", {}, num(lastVal.y, 4)), ` at step ${num(lastVal.x)}`));
      const before = train.filter((p) => p.x <= lastVal.x).slice(-5);
      if (before.length) {
        const trainAt = before.reduce((s, p) => s + p.y, 0) / before.length;
        gap = lastVal.y - trainAt;
        items.push(h("span", { class: "gap", title: "latest validation loss minus the training loss at that step (mean of the last 5 reports)" },
          "gap (val \u2212 train) ", h("b", { id: "loss-gap" }, `${gap >= 0 ? "+" : ""}${gap.toFixed(4)}`)));
      }
    }
    setData(container, { gap: gap === null ? "" : gap.toFixed(6) });
    fill(meta, items.length ? items : h("span", {}, "the trainer reports loss as it trains; the evaluator adds validation loss per checkpoint"));
  }

  function levelKeyOrder(a, b) {
    const [sa, la] = a.split("/");
    const [sb, lb] = b.split("/");
    return sa.localeCompare(sb) || (Number(la) - Number(lb)) || a.localeCompare(b);
  }

  function hexToRgba(hex, alpha) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
  }

  function renderAccuracy() {
    const container = document.getElementById("chart-accuracy");
    const scores = (state.scores || []).filter((s) => ms(s.time) !== null);
    const markers = (state.markers || []).filter((m) => ms(m.time) !== null);
    const levels = new Map();
    for (const score of scores) {
      const x = ms(score.time);
      for (const [key, level] of Object.entries(score.levels || {})) {
        if (level.accuracy === null || level.accuracy === undefined) continue;
        if (!levels.has(key)) levels.set(key, []);
        levels.get(key).push({
          x, y: level.accuracy, low: level.low ?? level.accuracy, high: level.high ?? level.accuracy,
          correct: level.correct, total: level.total, run_id: score.run_id,
        });
      }
    }
    const keys = [...levels.keys()].sort(levelKeyOrder);
    const points = keys.reduce((sum, k) => sum + levels.get(k).length, 0);
    setData(container, { points, levels: keys.length, scores: scores.length, markers: markers.length });

    const meta = document.querySelector("#panel-accuracy .chart-meta");
    const latest = scores[scores.length - 1];
    fill(meta, latest
      ? [h("span", {}, "latest ", code(latest.checkpoint_sha256, 10), ` ${latest.run_id && latest.run_id !== "base" ? `run ${latest.run_id}` : "base model"}`),
        h("span", {}, "selection exact match ", h("b", {}, pct(latest.exact_match)), ` [${pct(latest.low)}, ${pct(latest.high)}]`),
        h("span", {}, h("b", {}, String(scores.length)), ` scored \u00b7 `, h("b", {}, String(markers.length)), " events")]
      : h("span", {}, "each candidate scored on the selection suite adds a point per level; promotions and level changes are marked"));

    if (!charts.accuracy) return;
    const times = [...scores.map((s) => ms(s.time)), ...markers.map((m) => ms(m.time))];
    let lo = Math.min(...times);
    let hi = Math.max(...times);
    if (!times.length) {
      hi = Date.now() + clockSkewMs;
      lo = hi - 3600 * 1000;
    }
    const pad = Math.max(30 * 1000, (hi - lo) * 0.06);
    // Ticks on round times: a step from the list that gives at most 8 of them, the range
    // widened to whole steps.
    const step = TIME_STEPS.find((s) => (hi - lo + 2 * pad) / s <= 8) || TIME_STEPS[TIME_STEPS.length - 1];
    lo = Math.floor((lo - pad) / step) * step;
    hi = Math.ceil((hi + pad) / step) * step;
    accuracyStep = step;

    const datasets = [];
    keys.forEach((key, i) => {
      const colour = PALETTE[i % PALETTE.length];
      const data = levels.get(key);
      // The 95% interval: a transparent low line and a high line filled down to it.
      // Each bound's point is a short dash (an error bar's cap), so a lone score shows its interval too.
      const cap = { pointStyle: "line", pointRadius: 6, pointHoverRadius: 7, pointBorderWidth: 2, pointBorderColor: hexToRgba(colour, 0.75) };
      datasets.push({ label: `${key} low`, band: true, data: data.map((p) => ({ x: p.x, y: p.low })), borderWidth: 0, borderColor: "transparent", fill: false, ...cap });
      datasets.push({ label: `${key} high`, band: true, data: data.map((p) => ({ x: p.x, y: p.high })), borderWidth: 0, borderColor: "transparent", backgroundColor: hexToRgba(colour, 0.14), fill: "-1", ...cap });
      datasets.push({ label: key, data, borderColor: colour, backgroundColor: colour, borderWidth: 2, pointRadius: 3.5, pointHoverRadius: 6, fill: false });
      // A point at 0% or 100% is drawn whole, not cut by the chart's edge.
      for (const d of datasets.slice(-3)) d.clip = 8;
    });
    const chart = charts.accuracy;
    chart.data.datasets = datasets;
    chart.options.scales.x.min = lo;
    chart.options.scales.x.max = hi;
    chart.options.scales.x.ticks.stepSize = step;
    const annotations = {};
    markers.forEach((m, i) => {
      const colour = MARKER_COLOURS[m.kind] || "#6b7486";
      const text = `${m.kind.replace("_", " ")}: ${m.label || ""}`.trim();
      annotations[`marker${i}`] = {
        type: "line", scaleID: "x", value: ms(m.time), borderColor: colour, borderWidth: 1.5, borderDash: m.kind === "level_change" ? [5, 4] : [],
        label: {
          display: true, content: text.length > 60 ? `${text.slice(0, 59)}\u2026` : text,
          position: ["start", "center", "end"][i % 3], backgroundColor: hexToRgba(colour, 0.9), color: "#fff",
          font: { size: 10, weight: "600" }, padding: { x: 5, y: 2 }, borderRadius: 4,
        },
      };
    });
    chart.options.plugins.annotation.annotations = annotations;
    chart.update("none");
  }

  // ---------------------------------------------------------------- champion and decisions

  function renderChampion() {
    const panel = document.getElementById("panel-champion");
    const c = state.champion;
    const champions = state.champions || [];
    const decisions = state.decisions || [];
    const deployment = state.deployment;
    const test = c ? c.test : null;
    setData(panel, {
      sha256: c ? c.checkpoint_sha256 : "", runId: c ? c.run_id : "", checkpointUri: c ? c.checkpoint_uri : "",
      champions: champions.length, decisions: decisions.length, deploymentState: deployment ? deployment.state : "",
      testVersion: test ? test.suite_version : "", testExactMatch: test ? test.exact_match : "",
    });
    const parts = [];
    if (deployment && deployment.state === "staged") {
      parts.push(h("div", { class: "reason staged" }, badge(`${deployment.kind || "deployment"} staged`, "info"), " ",
        code(deployment.checkpoint_sha256, 12), deployment.run_id ? ` (run ${short(deployment.run_id, 16)}, step ${num(deployment.step)})` : "",
        ": waiting for an inference replica to serve it", deployment.staged_at ? [" \u00b7 ", timeEl(deployment.staged_at)] : null));
    } else if (deployment && deployment.state === "failed" && !(c && c.checkpoint_sha256 === deployment.checkpoint_sha256)) {
      parts.push(h("div", { class: "reason failed" }, badge("deployment failed", "bad"), " ", code(deployment.checkpoint_sha256, 12), `: ${deployment.reason || "no reason recorded"}`));
    }
    if (c) {
      const servedBy = Array.isArray(c.served_by) ? c.served_by : [];
      parts.push(
        h("div", { class: "champion-head" },
          h("span", { class: "sha", title: c.checkpoint_sha256 }, short(c.checkpoint_sha256, 16)),
          badge(c.kind === "rollback" ? "serving (rollback)" : "serving", c.kind === "rollback" ? "warn" : "ok"),
          h("span", { class: "muted" }, "since ", timeEl(c.time)), traceLink(c.trace_id)),
        h("dl", { class: "kv" },
          h("dt", {}, "checkpoint"), h("dd", { class: "mono" }, c.checkpoint_uri || DASH),
          h("dt", {}, "run"), h("dd", {}, c.run_id ? code(c.run_id, 40) : h("span", { class: "muted" }, "base model"), c.step !== null && c.step !== undefined ? ` \u00b7 step ${num(c.step)}` : ""),
          h("dt", {}, "sealed test"), h("dd", { class: "sealed-test" }, test
            ? [h("b", {}, pct(test.exact_match)), ` [95% ${pct(test.low)}, ${pct(test.high)}] on ${num(test.num_examples)} \u00b7 `,
              h("span", { class: "muted" }, test.suite_version), " ", traceLink(test.trace_id)]
            : h("span", { class: "muted" }, "not yet tested: the evaluator scores every champion on the sealed test suite")),
          test ? [h("dt", {}, "val loss"), h("dd", {}, num(test.val_loss, 4))] : null,
          servedBy.length ? [h("dt", {}, "served by"), h("dd", {}, servedBy.join(", "))] : null),
        test ? testLevels(test) : null,
        h("div", { class: "reason", title: "why it was promoted (the selection suite decides; its numbers are not the champion's accuracy)" },
          c.reason || "no reason recorded"));
    } else {
      parts.push(empty("No champion yet: the first scored checkpoint that passes the promotion rule becomes one"));
    }
    if (champions.length) {
      parts.push(h("div", { class: "subhead" }, `History (${champions.length})`),
        h("div", { class: "scroll", style: "max-height:150px" }, table([["when"], ["checkpoint"], ["sealed test", "num"], ["why"]],
          champions.map((x) => h("tr", { "data-sha256": x.checkpoint_sha256 },
            h("td", {}, timeEl(x.time)), h("td", {}, code(x.checkpoint_sha256, 10)),
            h("td", { class: "num", title: x.test ? `95% [${pct(x.test.low)}, ${pct(x.test.high)}] on ${x.test.num_examples}, ${x.test.suite_version}` : "not tested" },
              x.test ? pct(x.test.exact_match) : DASH),
            h("td", { class: "why" }, x.reason || DASH))), "history")));
    }
    if (decisions.length) {
      parts.push(h("div", { class: "subhead" }, `Latest decisions (${decisions.length})`),
        h("div", { class: "scroll", style: "max-height:150px" }, table([["when"], ["outcome"], ["checkpoint"], ["reason"]],
          decisions.slice(0, 20).map((d) => h("tr", { "data-outcome": d.outcome },
            h("td", {}, timeEl(d.time)), h("td", {}, stateBadge(d.outcome)),
            h("td", {}, code(d.checkpoint_sha256, 10), d.run_id ? h("div", { class: "muted small" }, short(d.run_id, 40)) : null),
            h("td", { class: "why" }, d.reason || DASH))), "history")));
    }
    fill(panelBody("panel-champion"), parts);
  }

  /** The champion's sealed test per level: accuracy with its 95% interval, items right. */
  function testLevels(test) {
    const keys = Object.keys(test.levels || {}).sort(levelKeyOrder);
    if (!keys.length) return null;
    return h("div", { class: "scroll", style: "max-height:180px" }, table([["level"], ["accuracy", "num"], ["95% interval", "num"], ["right", "num"]],
      keys.map((key) => {
        const level = test.levels[key];
        return h("tr", { "data-level": key },
          h("td", {}, key), h("td", { class: "num" }, h("b", {}, pct(level.accuracy))),
          h("td", { class: "num" }, `${pct(level.low)} \u2013 ${pct(level.high)}`),
          h("td", { class: "num" }, `${level.correct}/${level.total}`));
      }), "history test-levels"));
  }

  // ---------------------------------------------------------------- curriculum

  function renderCurriculum() {
    const panel = document.getElementById("panel-curriculum");
    const curriculum = state.curriculum || {};
    const skills = Object.keys(curriculum).sort();
    setData(panel, { skills: skills.length, levels: skills.map((s) => `${s}:${curriculum[s].level}`).join(" ") });
    if (!skills.length) return fill(panelBody("panel-curriculum"), empty("No skill tracked yet"));
    fill(panelBody("panel-curriculum"), skills.map((skill) => {
      const c = curriculum[skill];
      const changes = (c.changes || []).slice(-3).reverse();
      return h("div", { class: "skill", "data-skill": skill, "data-level": c.level },
        h("div", { class: "skill-head" },
          h("span", { class: "skill-name" }, skill),
          h("span", { class: "level" }, h("small", {}, "level"), String(c.level))),
        h("div", { class: "muted small" }, `${num(c.datasets_submitted || 0)} practice datasets written`),
        (c.recent || []).length
          ? h("div", { class: "recent", title: "accuracy at the current level, latest evaluations" }, (c.recent || []).map((a) => h("span", {}, pct(a, 0))))
          : h("div", { class: "muted small" }, "no evaluation at this level yet"),
        changes.length ? h("ul", { class: "changes" }, changes.map((ch) => h("li", { title: ch.reason || "" },
          `${ch.from} \u2192 ${ch.to}`, ch.accuracy !== null && ch.accuracy !== undefined ? ` at ${pct(ch.accuracy, 0)}` : "", " \u00b7 ", timeEl(ch.time)))) : null);
    }));
  }

  // ---------------------------------------------------------------- datasets

  function renderDatasets() {
    const panel = document.getElementById("panel-datasets");
    const datasets = state.datasets || [];
    const counts = {};
    for (const d of datasets) counts[d.state] = (counts[d.state] || 0) + 1;
    setData(panel, { count: datasets.length, accepted: (counts.accepted || 0) + (counts.training || 0) + (counts.trained || 0), rejected: counts.rejected || 0 });
    if (!datasets.length) return fill(panelBody("panel-datasets"), empty("No dataset submitted yet: drop a JSONL file into the inbox folder, or `flywheel submit`"));
    const summary = Object.entries(counts).map(([k, v]) => h("span", { style: "margin-right:10px" }, stateBadge(k), ` ${v}`));
    fill(panelBody("panel-datasets"),
      h("div", { class: "small", style: "margin-bottom:6px" }, summary),
      h("div", { class: "scroll", style: "max-height:320px" }, table(
        [["dataset"], ["state"], ["rows", "num"], ["dropped", "num"], ["validation report"], ["submitted"], ["trace"]],
        datasets.map((d) => h("tr", { "data-name": d.name, "data-state": d.state, "data-submission-id": d.submission_id, "data-dataset-id": d.dataset_id || "" },
          h("td", {}, h("div", { class: "dname" }, d.name || short(d.submission_id)),
            h("div", { class: "muted small" }, [d.channel, d.priority && `priority ${d.priority}`, d.submitted_by && `by ${d.submitted_by}`].filter(Boolean).join(" \u00b7 "))),
          h("td", {}, stateBadge(d.state), d.run_id ? h("div", { class: "muted small" }, "run ", code(d.run_id, 40)) : null),
          h("td", { class: "num" }, num(d.num_rows)),
          h("td", { class: "num" }, num(d.num_rows_dropped)),
          h("td", {},
            (d.reasons || []).length ? h("ul", { class: "reasons" }, d.reasons.map((r) => h("li", {}, r))) : null,
            d.report_url || d.report_uri ? h("div", { class: "report", title: d.report_uri || d.report_url }, reportLink(d.report_url || d.report_uri)) : null,
            !(d.reasons || []).length && !d.report_uri ? h("span", { class: "muted" }, d.state === "submitted" ? "validating\u2026" : DASH) : null),
          h("td", {}, timeEl(d.time)),
          h("td", {}, traceLink(d.trace_id)))),
        "datasets")));
  }

  function reportLink(uri) {
    if (/^https?:\/\//.test(uri) || uri.startsWith("/api/")) return h("a", { href: uri, target: "_blank", rel: "noopener", class: "report-link" }, "validation report");
    const name = uri.split("/").slice(-2).join("/");
    return ["report ", h("code", {}, name)];
  }

  // ---------------------------------------------------------------- dead letters

  function renderDeadLetters() {
    const panel = document.getElementById("panel-deadletters");
    const letters = state.dead_letters || [];
    setData(panel, { count: letters.length });
    if (!letters.length) return fill(panelBody("panel-deadletters"), h("div", { class: "empty" }, "None: every message was handled"));
    fill(panelBody("panel-deadletters"), h("div", { class: "scroll", style: "max-height:320px" }, table(
      [["#", "num"], ["when"], ["subject / consumer"], ["reason"]],
      letters.map((d) => h("tr", { "data-seq": d.seq },
        h("td", { class: "num" }, String(d.seq)),
        h("td", {}, timeEl(d.time)),
        h("td", {}, h("code", {}, d.subject || DASH), h("div", { class: "muted small" }, d.consumer || "")),
        h("td", { class: "why" }, d.reason || DASH))),
      "deadletters")));
  }

  // ---------------------------------------------------------------- lineage

  function renderLineage() {
    const c = state.champion;
    const key = c ? `${c.checkpoint_sha256}|${c.time}` : null;
    if (key === lineageKey) return;
    lineageKey = key;
    clearTimeout(lineageRetry);
    const panel = document.getElementById("panel-lineage");
    if (!c) {
      setData(panel, { loaded: "none", model: "" });
      return fill(panelBody("panel-lineage"), empty("Nothing deployed yet"));
    }
    setData(panel, { loaded: "loading", model: c.checkpoint_sha256 });
    loadLineage(key, 0);
  }

  async function loadLineage(key, attempt) {
    const panel = document.getElementById("panel-lineage");
    let response;
    let body;
    try {
      response = await fetch("/api/lineage", { headers: { Accept: "application/json" }, cache: "no-store" });
      body = await response.json().catch(() => null);
    } catch (err) {
      response = null;
    }
    if (key !== lineageKey) return; // the champion changed meanwhile: a newer fetch owns the panel
    if (!response || response.status >= 500 || (!response.ok && attempt < 5 && response.status === 409)) {
      // Not reachable, or the read model has not caught up with the deployment yet: try again.
      if (attempt < 20) lineageRetry = setTimeout(() => loadLineage(key, attempt + 1), Math.min(2000 * (attempt + 1), 10000));
      setData(panel, { loaded: "retrying" });
      if (!panelBody("panel-lineage").querySelector(".tree")) fill(panelBody("panel-lineage"), empty("Loading lineage\u2026"));
      return;
    }
    if (!response.ok) {
      setData(panel, { loaded: "error" });
      return fill(panelBody("panel-lineage"), empty((body && body.detail) || `lineage unavailable (HTTP ${response.status})`));
    }
    setData(panel, { loaded: "true" });
    fill(panelBody("panel-lineage"), h("div", { class: "scroll", style: "max-height:440px" }, lineageDocument(body)));
  }

  // The lineage is rendered generically (any JSON): plain fields as key/value rows, lists of
  // objects as a list of hops, nested objects under their name. Two levels are open; deeper
  // ones fold into <details>. A top-level "summary" sentence, when there is one, leads.
  const OPEN_DEPTH = 3;
  const NAME_KEYS = ["name", "dataset_name", "kind", "type", "run_id", "uri", "checkpoint_uri", "dataset_id", "sha256", "checkpoint_sha256", "id"];

  function humanKey(key) {
    return String(key).replace(/_/g, " ");
  }

  function isPlain(value) {
    return value === null || value === undefined || ["string", "number", "boolean"].includes(typeof value);
  }

  function isFlat(value) {
    return isPlain(value) || (Array.isArray(value) && value.every(isPlain));
  }

  function plainValue(key, value) {
    if (value === null || value === undefined || value === "") return h("span", { class: "muted" }, DASH);
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value === "number") return /accuracy|exact|^low$|^high$|fraction/.test(key) && value <= 1 && value >= 0 ? pct(value) : num(value, 4);
    const text = String(value);
    if (/trace_ids?$|^trace$/.test(key) && /^[0-9a-f]{16,32}$/.test(text)) return traceLink(text, text.slice(0, 12));
    if (/sha256|^sha$/.test(key) && /^[0-9a-f]{32,}$/.test(text)) return h("code", { title: text }, text.slice(0, 16));
    if (/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/.test(text) && ms(text) !== null) return h("span", { title: text }, clock(ms(text)), " (", timeEl(text), ")");
    return text;
  }

  /** A short name for an object: its first naming field, here or one level down. */
  function nameOf(obj) {
    for (const key of NAME_KEYS) {
      if (typeof obj[key] === "string" && obj[key]) return `${humanKey(key)} ${obj[key].length > 40 ? `\u2026${obj[key].slice(-38)}` : obj[key]}`;
    }
    return "";
  }

  function hopTitle(obj, index) {
    const parts = [];
    // A hop usually holds a run and a dataset: name both when they are there.
    for (const [key, value] of Object.entries(obj)) {
      if (value && typeof value === "object" && !Array.isArray(value)) {
        const sha = typeof value.sha256 === "string" ? value.sha256.slice(0, 10) : "";
        const name = value.name || value.dataset_name || sha || value.run_id;
        if (typeof name === "string" && name) parts.push(`${humanKey(key)} ${name}`);
      }
    }
    const own = nameOf(obj);
    return [`#${index + 1}`, own, ...parts].filter(Boolean).join(" \u00b7 ");
  }

  function section(title, name, body, depth) {
    const label = [title, name ? h("span", { class: "subhead-name" }, ` \u00b7 ${name}`) : null];
    if (depth >= OPEN_DEPTH) return h("details", { class: "lineage-fold" }, h("summary", {}, label), body);
    return [h("div", { class: "subhead" }, label), body];
  }

  /** Any JSON value as nested key/value rows; lists of objects as a list of hops. */
  function lineageView(value, key = "", depth = 0) {
    if (isPlain(value)) return plainValue(key, value);
    if (Array.isArray(value)) {
      if (!value.length) return h("span", { class: "muted" }, "none");
      if (value.every(isPlain)) return h("span", {}, value.map((v, i) => [i ? ", " : "", plainValue(key, v)]));
      return h("ol", { class: "tree", "data-key": key },
        value.map((item, i) => h("li", {}, isPlain(item) ? plainValue(key, item)
          : h("div", { class: "hop", "data-depth": depth }, h("div", { class: "hop-title" }, Array.isArray(item) ? `#${i + 1}` : hopTitle(item, i)),
            lineageView(item, key, depth + 1)))));
    }
    const entries = Object.entries(value);
    if (!entries.length) return h("span", { class: "muted" }, "none");
    // Plain fields first, as rows; nested lists and objects after them, each under its name.
    const plain = entries.filter(([k, v]) => isFlat(v) && !(depth === 0 && k === "summary"));
    // Lists (the hops) before single objects: the chain is the story, the rest details.
    const nested = entries.filter(([, v]) => !isFlat(v)).sort(([, a], [, b]) => Number(!Array.isArray(a)) - Number(!Array.isArray(b)));
    return h("div", { class: "lineage-node", "data-depth": depth },
      plain.length ? h("dl", { class: "kv" }, plain.map(([k, v]) => [h("dt", { class: "lineage-key" }, humanKey(k)), h("dd", {}, lineageView(v, k, depth + 1))])) : null,
      nested.map(([k, v]) => section(Array.isArray(v) ? `${humanKey(k)} (${v.length})` : humanKey(k), Array.isArray(v) ? "" : nameOf(v),
        lineageView(v, k, depth + 1), depth)));
  }

  function lineageDocument(body) {
    const summary = body && typeof body.summary === "string" && body.summary ? h("div", { class: "reason lineage-summary" }, body.summary) : null;
    return [summary, lineageView(body)];
  }

  // ---------------------------------------------------------------- applying updates

  function apply(message, { all = false } = {}) {
    // Sections the backend groups under "meta" (version, caught_up, trace_url, now) are read
    // as top-level fields, whichever way they come.
    if (message.meta && typeof message.meta === "object" && !Array.isArray(message.meta)) {
      message = { ...message.meta, ...message };
    }
    Object.assign(state, message);
    if (typeof message.now === "string" && ms(message.now) !== null) clockSkewMs = ms(message.now) - Date.now();
    const changed = new Set(Object.keys(message));
    for (const panel of PANELS) {
      if (all || panel.sections.some((s) => changed.has(s))) {
        try {
          panel.render();
        } catch (err) {
          console.error(`rendering ${panel.id} failed`, err);
        }
      }
    }
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  }

  function setConnection(status, label) {
    const el = document.getElementById("connection");
    el.dataset.status = status;
    el.querySelector(".label").textContent = label || status;
  }

  let source = null;

  function connect() {
    source = new EventSource("/api/stream");
    source.onopen = () => setConnection("live");
    source.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (err) {
        console.error("bad message from /api/stream", err);
        return;
      }
      setConnection("live");
      // The event id is the read model's version when the message was made.
      if (event.lastEventId && /^\d+$/.test(event.lastEventId)) message.version = Number(event.lastEventId);
      apply(message);
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. an HTTP error): open a new one ourselves.
        setConnection("reconnecting");
        source.close();
        setTimeout(connect, 3000);
      } else {
        setConnection("reconnecting");
      }
    };
  }

  async function start() {
    makeCharts();
    // Draw every panel once (empty), then the whole state, then follow the stream.
    apply({}, { all: true });
    try {
      const response = await fetch("/api/state", { cache: "no-store" });
      if (response.ok) apply(await response.json(), { all: true });
    } catch (err) {
      console.warn("GET /api/state failed; waiting for the stream", err);
    }
    connect();
    setInterval(tickTimes, 5000);
  }

  window.flywheelDashboard = { state, charts };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

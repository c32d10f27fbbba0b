// The live pool page (pglayer.fastapi._live): polls pool.json every second, keeps the last
// minutes of history here, draws them with uPlot. No build step; every text is set through
// textContent (never parsed as HTML). A slow statement is its verb and a digest: its text
// is in the slow-query log line with the same request id.
"use strict";

(() => {
  const PERIOD_MS = 1000;
  const HISTORY = 300; // points kept per series: 5 minutes at one poll a second
  const WINDOW = 10; // polls over which the acquire-wait percentiles are shown

  const main = document.getElementById("pools");
  const statusEl = document.getElementById("status");
  const template = document.getElementById("pool-template");
  const views = new Map(); // pool name -> view
  let stopped = false;

  const fmtInt = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));

  function fmtBound(seconds) {
    if (seconds == null) return "–";
    if (!Number.isFinite(seconds)) return "> 10 s";
    if (seconds < 1) return "≤ " + +(seconds * 1000).toPrecision(3) + " ms";
    return "≤ " + seconds + " s";
  }

  // Upper bound of the bucket holding quantile q; counts are per bucket (last: overflow).
  function quantile(bounds, counts, q) {
    let n = 0;
    for (const c of counts) n += c;
    if (n === 0) return null;
    const rank = q * n;
    let seen = 0;
    for (let i = 0; i < counts.length; i++) {
      seen += counts[i];
      if (seen >= rank) return i < bounds.length ? bounds[i] : Infinity;
    }
    return Infinity;
  }

  const minus = (a, b) => a.map((v, i) => v - (b ? b[i] : 0));

  // Writing the same text again still costs the browser a layout: skip it.
  function put(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function setStatus(text, state) {
    put(statusEl, text);
    if (statusEl.dataset.state !== state) statusEl.dataset.state = state;
  }

  function chartWidth(el) {
    return Math.max(300, Math.floor(el.getBoundingClientRect().width) || 400);
  }

  function makeChart(el, series, yLabel) {
    if (typeof uPlot === "undefined") return null;
    const opts = {
      width: chartWidth(el),
      height: 180,
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(hi * 1.1, 1)] } },
      axes: [{}, { label: yLabel, size: 50 }],
      series: [{}, ...series.map(([label, stroke, fill]) => ({ label, stroke, fill, width: 2, points: { show: false } }))],
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
    };
    return new uPlot(opts, [[], ...series.map(() => [])], el);
  }

  function createView(name) {
    const el = template.content.firstElementChild.cloneNode(true);
    el.dataset.pool = name;
    main.appendChild(el);
    const field = (f) => el.querySelector(`[data-field="${f}"]`);
    const view = {
      el,
      fields: {},
      tables: {},
      tableKeys: {},
      snaps: [], // the last WINDOW + 1 acquire-wait snapshots
      hist: { t: [], inUse: [], idle: [], waiting: [], p50: [], p99: [] },
      charts: {},
    };
    for (const node of el.querySelectorAll("[data-field]")) view.fields[node.dataset.field] = node;
    for (const node of el.querySelectorAll("[data-table]")) view.tables[node.dataset.table] = node;
    field("name").textContent = name;
    view.charts.conns = makeChart(el.querySelector('[data-chart="conns"]'), [
      ["in use", "#2563eb", "rgba(37, 99, 235, 0.12)"],
      ["idle", "#16a34a"],
      ["waiting", "#dc2626"],
    ], "connections");
    view.charts.wait = makeChart(el.querySelector('[data-chart="wait"]'), [
      ["p50", "#2563eb"],
      ["p99", "#d97706"],
    ], "ms");
    views.set(name, view);
    return view;
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  // Rows of [label, value]; rebuilt only when they change.
  function fillTable(view, name, rows) {
    const key = JSON.stringify(rows);
    if (view.tableKeys[name] === key) return;
    view.tableKeys[name] = key;
    const body = view.tables[name];
    body.replaceChildren();
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      cell(tr, "none", "none").colSpan = 2;
      body.appendChild(tr);
      return;
    }
    for (const [label, value] of rows) {
      const tr = document.createElement("tr");
      cell(tr, label);
      cell(tr, fmtInt(value), "v");
      body.appendChild(tr);
    }
  }

  function fillSlow(view, recent) {
    const key = recent.length ? recent[0].at + ":" + recent[0].request_id + ":" + recent.length : "";
    if (view.tableKeys.slow === key) return;
    view.tableKeys.slow = key;
    const body = view.tables.slow;
    body.replaceChildren();
    if (recent.length === 0) {
      const tr = document.createElement("tr");
      cell(tr, "none yet", "none").colSpan = 5;
      body.appendChild(tr);
      return;
    }
    const sorted = [...recent].sort((a, b) => b.seconds - a.seconds);
    for (const q of sorted) {
      const tr = document.createElement("tr");
      cell(tr, new Date(q.at * 1000).toLocaleTimeString("en-GB"));
      cell(tr, q.seconds.toFixed(3));
      cell(tr, q.operation);
      cell(tr, q.request_id);
      const sql = cell(tr, q.error ? `${q.statement}  [${q.error}]` : q.statement, "sql");
      if (q.error) sql.classList.add("err");
      body.appendChild(tr);
    }
  }

  function push(array, value) {
    array.push(value);
    if (array.length > HISTORY) array.shift();
  }

  function render(view, p, now) {
    const f = view.fields;
    const wait = p.acquire_wait;
    const prev = view.snaps.length ? view.snaps[view.snaps.length - 1] : null;
    view.snaps.push({ t: now, counts: wait.counts, acquisitions: p.acquisitions });
    if (view.snaps.length > WINDOW + 1) view.snaps.shift();
    const oldest = view.snaps[0];

    // Acquire-wait percentiles over the last WINDOW polls, and over the last second.
    const windowCounts = minus(wait.counts, view.snaps.length > 1 ? oldest.counts : null);
    const p50w = view.snaps.length > 1 ? quantile(wait.bounds, windowCounts, 0.5) : null;
    const p99w = view.snaps.length > 1 ? quantile(wait.bounds, windowCounts, 0.99) : null;
    const ms = (s) => (s == null ? null : Math.min(s, 10) * 1000);
    let p50s = null;
    let p99s = null;
    let rate = null;
    if (prev) {
      const delta = minus(wait.counts, prev.counts);
      p50s = ms(quantile(wait.bounds, delta, 0.5));
      p99s = ms(quantile(wait.bounds, delta, 0.99));
      rate = (p.acquisitions - prev.acquisitions) / Math.max(now - prev.t, 0.001);
    }

    put(f.in_use, fmtInt(p.in_use));
    put(f.idle, fmtInt(p.idle));
    put(f.waiting, fmtInt(p.waiting));
    const hot = p.waiting > 0 ? "1" : "0";
    if (f.waiting.dataset.hot !== hot) f.waiting.dataset.hot = hot;
    put(f.size, `${p.size} / ${p.max_size}`);
    put(f.acquisitions, fmtInt(p.acquisitions));
    put(f.rate, rate == null ? "–" : fmtInt(Math.round(rate)));
    put(f.wait_p50, fmtBound(p50w));
    put(f.wait_p99, fmtBound(p99w));
    put(f.wait_all, `${fmtBound(wait.p50)} / ${fmtBound(wait.p99)}`);
    put(f.slow_queries, fmtInt(p.slow_queries));

    const replica = p.replica;
    put(f.role, replica ? "replica" : p.open ? "primary" : "primary (not open)");
    if (replica) {
      put(f.rotation, replica.healthy ? "in rotation" : `out of rotation: ${replica.reason}`);
      const state = replica.healthy ? "ok" : "out";
      if (f.rotation.dataset.state !== state) f.rotation.dataset.state = state;
      put(f.lag, replica.lag_seconds == null ? "lag unknown" : `lag ${replica.lag_seconds.toFixed(2)} s`);
    } else {
      put(f.rotation, "");
      put(f.lag, "");
    }

    const refused = [
      ["shed (overloaded)", p.requests_shed],
      ["acquire timeouts", p.acquire_timeouts],
    ];
    for (const [name, b] of Object.entries(p.bulkheads)) {
      refused.push([`${name} (cap ${b.cap}): refused at once`, b.refused]);
      refused.push([`${name} (cap ${b.cap}): timed out waiting`, b.acquire_timeouts]);
    }
    fillTable(view, "refused", refused);
    fillTable(view, "errors", Object.entries(p.errors).sort((a, b) => b[1] - a[1]));
    fillTable(view, "retries", [
      ...Object.entries(p.retries).map(([k, v]) => [`retried: ${k}`, v]),
      ...Object.entries(p.give_ups).map(([k, v]) => [`gave up: ${k}`, v]),
    ]);
    const c = p.connections;
    fillTable(view, "connections", [
      ["opened", c.opened],
      ["closed", c.closed],
      ["lost", c.lost],
      ["failed to open", c.failed],
    ]);
    fillSlow(view, p.recent_slow);

    const h = view.hist;
    push(h.t, now);
    push(h.inUse, p.in_use);
    push(h.idle, p.idle);
    push(h.waiting, p.waiting);
    push(h.p50, p50s);
    push(h.p99, p99s);
    if (view.charts.conns) view.charts.conns.setData([h.t, h.inUse, h.idle, h.waiting]);
    if (view.charts.wait) view.charts.wait.setData([h.t, h.p50, h.p99]);
  }

  let worker = null;

  function update(data) {
    // Each worker process has its own pools and counters: rates and windows are computed
    // between polls of one worker only, so they start over when another one answers.
    if (data.worker !== worker) {
      for (const view of views.values()) view.snaps.length = 0;
      worker = data.worker;
    }
    for (const p of data.pools) render(views.get(p.name) || createView(p.name), p, data.time);
    const names = data.pools.map((p) => p.name).join(", ");
    const time = new Date(data.time * 1000).toLocaleTimeString("en-GB");
    setStatus(`live · ${names} · worker ${data.worker} · updated ${time}`, "live");
  }

  async function poll() {
    if (stopped) return;
    if (!document.hidden) {
      try {
        const response = await fetch("pool.json", {
          credentials: "same-origin",
          cache: "no-store",
          headers: { Accept: "application/json" },
        });
        if (response.status === 401 || response.status === 404) {
          stopped = true;
          setStatus("session ended: reload the page to sign in again", "stopped");
          return;
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        update(await response.json());
      } catch (error) {
        setStatus(`not updating (${error.message}); retrying`, "error");
      }
    }
    setTimeout(poll, PERIOD_MS);
  }

  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      for (const view of views.values()) {
        for (const [name, chart] of Object.entries(view.charts)) {
          if (chart) chart.setSize({ width: chartWidth(view.el.querySelector(`[data-chart="${name}"]`)), height: 180 });
        }
      }
    }, 200);
  });

  poll();
})();

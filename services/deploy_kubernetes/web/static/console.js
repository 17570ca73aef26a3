"use strict";
// The operator console. Its data comes from same-origin calls under /console/api, authorised by
// the HttpOnly session cookie; changes carry the X-Binder-Console header.
(() => {
  const $ = (id) => document.getElementById(id);
  const PAGE = 50;
  const view = { status: "", template: "", q: "", sort: "created", order: "desc", offset: 0 };
  let logSource = null;
  let searchTimer = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function ago(iso, now) {
    if (!iso) return "–";
    const secs = Math.max(0, (Date.parse(now) - Date.parse(iso)) / 1000);
    if (secs < 60) return `${Math.round(secs)} s ago`;
    if (secs < 3600) return `${Math.round(secs / 60)} min ago`;
    if (secs < 86400) return `${(secs / 3600).toFixed(1)} h ago`;
    return `${(secs / 86400).toFixed(1)} d ago`;
  }

  function age(iso, now) {
    return ago(iso, now).replace(" ago", "");
  }

  async function call(path, options = {}) {
    const init = { credentials: "same-origin", cache: "no-store", ...options };
    if (init.method && init.method !== "GET") {
      init.headers = { "X-Binder-Console": "1", "Content-Type": "application/json", ...(init.headers || {}) };
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new Error("the server is unreachable");
    }
    if (response.status === 403) {
      window.location.reload(); // the session ended: back to the sign-in form
      throw new Error("signed out");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  function showError(text) {
    $("console-error").textContent = text ? `Could not update: ${text}` : "";
  }

  function statusChip(status) {
    return el("span", { class: `status status-${status}` }, status);
  }

  // --- capacity, templates, pools, failures, latency ------------------------------------------

  function renderCapacity(data) {
    const cap = data.capacity;
    const items = [
      ["In use", `${cap.active} of ${cap["max-deployments"]}`],
      ["Deploying", String(cap.deploying)],
      ["Deployed", String(cap.deployed)],
    ];
    const limits = data["per-client"] || {};
    const names = { per_client_max_deployments: "Per client: running", per_client_launches_per_minute: "Per client: launches a minute" };
    for (const [key, label] of Object.entries(names)) {
      items.push(key in limits ? [label, String(limits[key])] : [label, "not configured on this server", "unset"]);
    }
    const held = Object.entries(data["per-client-in-use"] || {}).sort((a, b) => b[1] - a[1]);
    items.push(["Clients holding deployments", String(held.length)]);
    if (held.length) {
      items.push(["Busiest client", `${held[0][0]}: ${held[0][1]} running`]);
    }
    $("capacity").replaceChildren(...items.map(([k, v, cls]) => el("div", {}, el("dt", {}, k), el("dd", cls ? { class: cls } : {}, v))));
  }

  function renderPools(data) {
    const rows = data.templates.map((t) => {
      const input = el("input", { type: "number", min: "0", max: "1000", value: String(t["pool-size"]), "aria-label": `New pool size for ${t.name}` });
      const form = el("form", { class: "pool-form" }, input, el("button", { type: "submit" }, "Resize"));
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        try {
          await call(`/console/api/pools/${encodeURIComponent(t.name)}`, { method: "PUT", body: JSON.stringify({ size: Number(input.value) }) });
          showError("");
          refresh();
        } catch (err) {
          showError(err.message);
        }
      });
      const limits = Object.entries(t.limits || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "–";
      const max = t["max-deployments"] ? ` of ${t["max-deployments"]}` : "";
      return el("tr", {},
        el("th", { scope: "row" }, t.name),
        el("td", { "data-label": "Image" }, el("code", {}, t["image-source"] || t["image-name"] || "–")),
        el("td", { "data-label": "Limits" }, limits),
        el("td", { "data-label": "Running" }, `${t.active}${max}`),
        el("td", { "data-label": "Pool size" }, String(t.pool.size)),
        el("td", { "data-label": "Ready" }, String(t.pool.ready)),
        el("td", { "data-label": "Starting" }, String(t.pool.starting)),
        el("td", {}, form));
    });
    $("pool-rows").replaceChildren(...rows);
    const select = $("f-template");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "" }, "all"), ...data.templates.map((t) => el("option", {}, t.name)));
    select.value = chosen;
  }

  function renderFailures(data) {
    const items = data["recent-failures"].map((f) => el("li", {},
      el("span", { class: "mono" }, f.id.slice(0, 12)), ` (${f.template}, ${ago(f.ended || f.created, data.now)}): `, f.reason || "no reason recorded"));
    $("failures").replaceChildren(...(items.length ? items : [el("li", {}, "No failed launches.")]));
  }

  function renderLatency(latency) {
    const NS = "http://www.w3.org/2000/svg";
    const svgEl = (tag, attrs, text) => {
      const node = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
      if (text !== undefined) node.textContent = text;
      return node;
    };
    const series = [["false", "launched", "#0b5cad"], ["true", "from a pool", "#1a7f37"]].filter(([key]) => latency[key]);
    const box = $("latency");
    if (!series.length || series.every(([key]) => latency[key].count === 0)) {
      box.replaceChildren(el("p", { class: "note" }, "No launch has completed since the server started."));
      return;
    }
    const bounds = latency[series[0][0]].buckets.map(([le]) => le);
    const perBucket = (key) => latency[key].buckets.map(([, n], i, all) => n - (i ? all[i - 1][1] : 0));
    const counts = Object.fromEntries(series.map(([key]) => [key, perBucket(key)]));
    const top = Math.max(1, ...series.flatMap(([key]) => counts[key]));
    const width = 640, height = 180, left = 34, bottom = 34, slot = (width - left) / bounds.length;
    const bar = (slot - 6) / series.length;
    const summary = series.map(([key, label]) => `${label}: ${latency[key].count} launches, mean ${(latency[key].sum / Math.max(1, latency[key].count)).toFixed(2)} s`).join("; ");
    const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `Launch latency histogram. ${summary}` });
    svg.append(svgEl("title", {}, `Launch latency: ${summary}`));
    svg.append(svgEl("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, stroke: "#6e7781" }));
    svg.append(svgEl("text", { x: 0, y: 12, "font-size": 11, fill: "#4a4a4a" }, String(top)));
    bounds.forEach((le, i) => {
      const x = left + i * slot;
      series.forEach(([key, , colour], j) => {
        const h = ((height - bottom - 16) * counts[key][i]) / top;
        svg.append(svgEl("rect", { x: x + 3 + j * bar, y: height - bottom - h, width: bar - 1, height: h, fill: colour }));
      });
      const label = le === "+Inf" ? ">120" : `≤${Number(le)}`;
      svg.append(svgEl("text", { x: x + slot / 2, y: height - bottom + 14, "font-size": 10, "text-anchor": "middle", fill: "#4a4a4a" }, label));
    });
    svg.append(svgEl("text", { x: width / 2, y: height - 4, "font-size": 11, "text-anchor": "middle", fill: "#4a4a4a" }, "seconds from request to deployed"));
    const colours = { "#0b5cad": "blue", "#1a7f37": "green" };
    const legend = el("p", { class: "note" }, series.map(([key, label, colour]) => `${colours[colour]} bars: ${label} (${latency[key].count}, mean ${(latency[key].sum / Math.max(1, latency[key].count)).toFixed(2)} s)`).join("; "));
    box.replaceChildren(svg, legend);
  }

  async function loadOverview() {
    const data = await call("/console/api/overview");
    renderCapacity(data);
    renderPools(data);
    renderFailures(data);
    renderLatency(data.latency);
  }

  // --- deployments table -----------------------------------------------------------------------

  function actions(row) {
    const cell = el("td", {});
    cell.append(el("button", { type: "button", onclick: () => openLogs(row.id), "aria-label": `Logs of ${row.id}` }, "Logs"));
    if (row.status === "deploying" || row.status === "deployed") {
      cell.append(el("button", { type: "button", onclick: () => remove(row), "aria-label": `Delete ${row.id}` }, "Delete"));
    }
    if (row.url && row.status === "deployed") {
      cell.append(el("a", { href: row.url, "aria-label": `Open ${row.id}` }, "Open"));
    }
    return cell;
  }

  function renderDeployments(data) {
    const rows = data.rows.map((row) => el("tr", { "data-id": row.id },
      el("td", { "data-label": "Id" }, el("span", { class: "mono", title: row.id }, row.id)),
      el("td", { "data-label": "Template" }, row.template),
      el("td", { "data-label": "Status" }, statusChip(row.status)),
      el("td", { "data-label": "Age" }, age(row.created, data.now)),
      el("td", { "data-label": "Last activity" }, ago(row["last-activity"], data.now)),
      el("td", { class: "reason", "data-label": "Reason" }, row.reason || "–"),
      actions(row)));
    $("dep-rows").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "7" }, "No deployments match."))]));
    const counts = Object.entries(data.counts).map(([k, v]) => `${v.toLocaleString("en")} ${k}`).join(", ");
    $("dep-counts").textContent = `All records: ${counts}.`;
    const first = data.total ? data.offset + 1 : 0;
    const last = data.offset + data.rows.length;
    $("page-info").textContent = `${first.toLocaleString("en")}–${last.toLocaleString("en")} of ${data.total.toLocaleString("en")}`;
    $("prev").disabled = data.offset === 0;
    $("next").disabled = last >= data.total;
    for (const th of document.querySelectorAll("#dep-table th[data-sort]")) {
      if (th.dataset.sort === view.sort) th.setAttribute("aria-sort", view.order === "asc" ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  async function loadDeployments() {
    const params = new URLSearchParams({ sort: view.sort, order: view.order, offset: String(view.offset), limit: String(PAGE) });
    if (view.status) params.set("status", view.status);
    if (view.template) params.set("template", view.template);
    if (view.q) params.set("q", view.q);
    renderDeployments(await call(`/console/api/deployments?${params}`));
  }

  async function remove(row) {
    if (!window.confirm(`Delete deployment ${row.id} of ${row.template}?`)) return;
    try {
      await call(`/console/api/deployments/${encodeURIComponent(row.template)}/${row.id}`, { method: "DELETE" });
      showError("");
      await refresh();
    } catch (err) {
      showError(err.message);
    }
  }

  // --- logs -------------------------------------------------------------------------------------

  function logLine(record) {
    const time = (record.time || "").replace("T", " ").replace("Z", "");
    return `${time} ${record.service || ""} ${(record.level || "").toUpperCase()} ${record.message || ""}\n`;
  }

  function closeLogs() {
    if (logSource) logSource.close();
    logSource = null;
  }

  async function openLogs(id) {
    closeLogs();
    const section = $("logs");
    section.hidden = false;
    $("logs-title").textContent = `Logs of ${id}`;
    $("logs-title").focus();
    const pre = $("logs-lines");
    pre.textContent = "";
    $("logs-state").textContent = "Loading…";
    try {
      const data = await call(`/console/api/logs?app=${id}`);
      pre.textContent = data.records.map(logLine).join("") || "";
    } catch (err) {
      $("logs-state").textContent = `Could not read the logs: ${err.message}`;
      return;
    }
    const source = new EventSource(`/console/api/logs/stream?app=${id}`);
    logSource = source;
    $("logs-state").textContent = "Following new lines live.";
    source.addEventListener("log", (event) => {
      pre.append(logLine(JSON.parse(event.data)));
      pre.scrollTop = pre.scrollHeight;
    });
    source.addEventListener("ended", () => { closeLogs(); $("logs-state").textContent = "The live tail stopped."; });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        $("logs-state").textContent = "The live tail stopped (the log aggregator is unreachable).";
        closeLogs();
      } else {
        $("logs-state").textContent = "The live tail was cut; reconnecting…";
      }
    };
    source.onopen = () => { if (logSource === source) $("logs-state").textContent = "Following new lines live."; };
  }

  // --- wiring -----------------------------------------------------------------------------------

  async function refresh() {
    try {
      await Promise.all([loadOverview(), loadDeployments()]);
      showError("");
      $("updated").textContent = `Updated ${new Date().toLocaleTimeString("en-GB")}`;
    } catch (err) {
      if (err.message !== "signed out") showError(err.message);
    }
  }

  for (const th of document.querySelectorAll("#dep-table th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.sort;
      view.order = view.sort === key && view.order === "desc" ? "asc" : "desc";
      view.sort = key;
      view.offset = 0;
      loadDeployments().catch((err) => showError(err.message));
    });
  }
  $("f-status").addEventListener("change", (e) => { view.status = e.target.value; view.offset = 0; loadDeployments().catch((err) => showError(err.message)); });
  $("f-template").addEventListener("change", (e) => { view.template = e.target.value; view.offset = 0; loadDeployments().catch((err) => showError(err.message)); });
  $("f-q").addEventListener("input", (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { view.q = e.target.value.trim(); view.offset = 0; loadDeployments().catch((err) => showError(err.message)); }, 250);
  });
  $("dep-filters").addEventListener("submit", (e) => e.preventDefault());
  $("prev").addEventListener("click", () => { view.offset = Math.max(0, view.offset - PAGE); loadDeployments().catch((err) => showError(err.message)); });
  $("next").addEventListener("click", () => { view.offset += PAGE; loadDeployments().catch((err) => showError(err.message)); });
  $("refresh").addEventListener("click", refresh);
  $("logs-close").addEventListener("click", () => { closeLogs(); $("logs").hidden = true; });
  $("sign-out").addEventListener("click", async () => {
    closeLogs();
    try { await call("/console/session", { method: "DELETE" }); } catch (err) { /* reloads below */ }
    window.location.reload();
  });
  setInterval(() => { if (!document.hidden) refresh(); }, 5000);
  refresh();
})();

/* Aivonx status page: keeps the server-rendered page live.
 *
 * The page is complete without this script. With it, the state JSON is
 * polled every second and the DOM updated in place. Everything a node or a
 * user supplied (names, models, errors) goes in through textContent,
 * setAttribute or createElement, never innerHTML.
 */
(() => {
  "use strict";

  const body = document.body;
  const STATE_URL = body.dataset.stateUrl;
  const SLOTS = Number(body.dataset.sparkSlots) || 30;
  const CHIP_LIMIT = Number(body.dataset.chipLimit) || 8;
  const POLL_MS = 1000;
  const SPARK_W = 120;
  const SPARK_H = 28;

  const rows = document.getElementById("node-rows");
  const template = document.getElementById("row-template");
  const live = document.getElementById("live");
  const overall = document.getElementById("overall");
  if (!STATE_URL || !rows || !template) return;

  let skew = null; // server clock minus ours, in ms
  let timer = null;
  let lastState = null;

  // -- small helpers -------------------------------------------------------
  const slot = (root, name) => root.querySelector(`[data-f="${name}"]`);

  function setText(el, text) {
    text = String(text);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function serverNow() {
    return (Date.now() + (skew || 0)) / 1000;
  }

  // Same formats as aivonx/handlers/pages.py renders.
  function ago(since) {
    if (since === null || since === undefined || since === "") return "—";
    let s = Math.max(0, Math.floor(serverNow() - Number(since)));
    if (s < 60) return `${s}s`;
    let m = Math.floor(s / 60);
    s %= 60;
    if (m < 60) return `${m}m ${String(s).padStart(2, "0")}s`;
    let h = Math.floor(m / 60);
    m %= 60;
    if (h < 24) return `${h}h ${String(m).padStart(2, "0")}m`;
    const d = Math.floor(h / 24);
    h %= 24;
    return `${d}d ${h}h`;
  }

  function latencyText(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 0.001) return "<1 ms";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    return `${seconds.toFixed(2)} s`;
  }

  function sparkPoints(history) {
    const values = (history || []).filter((v) => v !== null && v !== undefined).slice(-SLOTS);
    if (values.length < 2) return "";
    const top = Math.max(...values) * 1.15 || 1;
    const step = SPARK_W / (SLOTS - 1);
    const offset = SPARK_W - step * (values.length - 1);
    const usable = SPARK_H - 4;
    return values
      .map((v, i) => `${(offset + i * step).toFixed(1)},${(SPARK_H - 2 - (v / top) * usable).toFixed(1)}`)
      .join(" ");
  }

  function summaryOf(nodes) {
    // Mirrors overall() in aivonx/handlers/pages.py.
    const active = nodes.filter((n) => n.status === "active").length;
    const enabled = nodes.filter((n) => n.status !== "drained").length;
    if (!nodes.length) return ["No nodes configured", "warn"];
    if (active === 0) return ["No node is serving", "bad"];
    if (active < enabled) {
      return [`${enabled - active} of ${enabled} node${enabled !== 1 ? "s" : ""} down`, "warn"];
    }
    return ["All nodes serving", "ok"];
  }

  // -- rendering ------------------------------------------------------------
  function chip(name, hot) {
    const li = el("li", hot.has(name) ? "chip hot" : "chip", name);
    li.setAttribute("title", name);
    return li;
  }

  function renderChips(ul, names, hotNames, empty) {
    const key = JSON.stringify([names, hotNames]);
    if (ul.dataset.key === key) return; // unchanged: leave open details alone
    ul.dataset.key = key;
    const hot = new Set(hotNames);
    const items = names.slice(0, CHIP_LIMIT).map((n) => chip(n, hot));
    if (!names.length) items.push(el("li", "none", empty));
    if (names.length > CHIP_LIMIT) {
      const more = el("li", "more");
      const details = el("details");
      details.append(el("summary", "", `+${names.length - CHIP_LIMIT} more`));
      const inner = el("ul", "chips");
      inner.append(...names.slice(CHIP_LIMIT).map((n) => chip(n, hot)));
      details.append(inner);
      more.append(details);
      items.push(more);
    }
    ul.replaceChildren(...items);
  }

  function newRow(id) {
    const tr = template.content.querySelector("tr").cloneNode(true);
    tr.dataset.id = String(id);
    // The template was rendered for node 0: point its forms at this node.
    for (const form of tr.querySelectorAll("form[action]")) {
      form.setAttribute("action", form.getAttribute("action").replace("/nodes/0/", `/nodes/${id}/`));
    }
    return tr;
  }

  function renderRow(tr, n) {
    tr.dataset.status = n.status;
    setText(slot(tr, "name"), n.name);
    setText(slot(tr, "url"), n.url);
    const badge = slot(tr, "status");
    badge.className = `badge s-${n.status}`;
    setText(badge, n.status);
    const since = slot(tr, "since");
    since.dataset.since = n.since === null ? "" : String(n.since);
    setText(since, ago(n.since));
    setText(slot(tr, "reason"), n.status === "active" ? "" : n.reason || "");
    setText(slot(tr, "latency"), latencyText(n.latency));
    const points = sparkPoints(n.latency_history);
    const line = slot(tr, "spark");
    if (line.getAttribute("points") !== points) line.setAttribute("points", points);
    setText(slot(tr, "active_requests"), n.active_requests);
    setText(slot(tr, "requests_served"), n.requests_served);
    setText(slot(tr, "errors"), n.errors);
    renderChips(slot(tr, "models"), n.models, n.loaded, "none listed");
    renderChips(slot(tr, "loaded"), n.loaded, n.loaded, "idle");
    document.dispatchEvent(new CustomEvent("aivonx:row", { detail: { tr, node: n } }));
  }

  function renderNodes(nodes) {
    const existing = new Map();
    for (const tr of rows.querySelectorAll(":scope > tr.node")) existing.set(tr.dataset.id, tr);
    nodes.forEach((n, i) => {
      const id = String(n.id);
      let tr = existing.get(id);
      existing.delete(id);
      if (!tr) tr = newRow(id);
      renderRow(tr, n);
      if (rows.children[i] !== tr) rows.insertBefore(tr, rows.children[i] || null);
    });
    for (const gone of existing.values()) gone.remove();
    const empty = document.getElementById("no-nodes");
    if (empty) empty.hidden = nodes.length > 0;
  }

  function renderSummary(state) {
    const nodes = state.nodes;
    setText(slot(document, "active-count"), nodes.filter((n) => n.status === "active").length);
    setText(slot(document, "node-count"), nodes.length);
    setText(slot(document, "strategy"), state.strategy);
    setText(slot(document, "total_active_requests"), state.total_active_requests);
    setText(slot(document, "requests_served"), state.requests_served);
    const errors = slot(document, "errors");
    setText(errors, state.errors);
    errors.classList.toggle("has-errors", state.errors > 0);
    setOverall(...summaryOf(nodes));
  }

  function setOverall(text, tone) {
    if (!overall) return;
    overall.className = `overall tone-${tone}`;
    setText(slot(overall, "summary"), text);
    const title = `${text} · Aivonx`;
    if (document.title !== title) document.title = title;
  }

  function render(state) {
    lastState = state;
    renderSummary(state);
    renderNodes(state.nodes);
    document.dispatchEvent(new CustomEvent("aivonx:state", { detail: state }));
  }

  function tick() {
    for (const t of rows.querySelectorAll("time[data-since]")) setText(t, ago(t.dataset.since));
  }

  function setLive(ok, why) {
    if (!live) return;
    live.hidden = false;
    live.classList.toggle("offline", !ok);
    if (ok) {
      setText(slot(live, "live"), "live");
      live.removeAttribute("title");
      live.classList.remove("beat");
      void live.offsetWidth; // restart the pulse animation
      live.classList.add("beat");
    } else {
      setText(slot(live, "live"), "offline, retrying");
      live.setAttribute("title", String(why || ""));
      setOverall("Aivonx unreachable", "bad");
    }
  }

  // -- polling --------------------------------------------------------------
  function noteServerClock(resp) {
    // Date has whole seconds: the server's clock is at least this far ahead.
    const date = Date.parse(resp.headers.get("Date") || "");
    if (Number.isNaN(date)) return;
    const sample = date - Date.now();
    skew = skew === null || Math.abs(sample - skew) > 5000 ? sample + 500 : Math.max(skew, sample);
  }

  async function poll() {
    clearTimeout(timer);
    timer = null;
    if (document.hidden) return; // resumed by visibilitychange
    try {
      const resp = await fetch(STATE_URL, {
        cache: "no-store",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      noteServerClock(resp);
      render(await resp.json());
      setLive(true);
    } catch (err) {
      setLive(false, err);
    }
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });
  setInterval(tick, 1000);

  // For the forms (ui-forms): refresh at once after a change.
  window.aivonx = {
    refresh: poll,
    get state() {
      return lastState;
    },
  };
  poll();
})();

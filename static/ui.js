/* Aivonx status page: keeps the server-rendered page live.
 *
 * The page is complete without this script. With it, the state JSON is
 * polled every second and the DOM updated in place. The script formats
 * nothing: every duration, latency, weight and summary comes ready from the
 * server (the `display` objects of the state, aivonx/display.py), the same
 * strings the server-rendered page shows. Everything a node or a user
 * supplied (names, models, errors) goes in through textContent, setAttribute
 * or createElement, never innerHTML.
 */
(() => {
  "use strict";

  const body = document.body;
  const STATE_URL = body.dataset.stateUrl;
  const CHIP_LIMIT = Number(body.dataset.chipLimit) || 8;
  const POLL_MS = 1000;

  const rows = document.getElementById("node-rows");
  const template = document.getElementById("row-template");
  const live = document.getElementById("live");
  const overall = document.getElementById("overall");
  if (!STATE_URL || !rows || !template) return;

  let timer = null;

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
      form.setAttribute("action", form.getAttribute("action").replace(/\/nodes\/0(?=\/|$)/, `/nodes/${id}`));
    }
    return tr;
  }

  function renderRow(tr, n) {
    const shown = n.display;
    tr.dataset.status = n.status;
    tr.dataset.health = n.health;
    setText(slot(tr, "name"), n.name);
    setText(slot(tr, "url"), n.url);
    const badge = slot(tr, "health");
    badge.className = `badge h-${n.health}`;
    badge.setAttribute("title", `Pool: ${n.status}`);
    setText(badge, n.health);
    const since = slot(tr, "since");
    since.dataset.since = n.since === null ? "" : String(n.since);
    setText(since, shown.since);
    setText(slot(tr, "pool"), shown.pool);
    // Why the node is not healthy: slow, failing, resting, unreachable, drained.
    setText(slot(tr, "reason"), n.health_reason || "");
    setText(slot(tr, "latency"), shown.latency);
    const line = slot(tr, "spark");
    if (line.getAttribute("points") !== shown.spark) line.setAttribute("points", shown.spark);
    setText(slot(tr, "active_requests"), n.active_requests);
    setText(slot(tr, "slots"), n.slots);
    slot(tr, "load").classList.toggle("full", n.active_requests >= n.slots);
    setText(slot(tr, "weight"), shown.weight_label);
    setText(slot(tr, "requests_served"), n.requests_served);
    setText(slot(tr, "errors"), n.errors);
    renderChips(slot(tr, "models"), n.models, n.loaded, "none listed");
    renderChips(slot(tr, "loaded"), n.loaded, n.loaded, "idle");
    renderControls(tr, n);
  }

  function renderControls(tr, n) {
    // Signed in: the row's forms follow the node too.
    for (const name of tr.querySelectorAll('[data-f="name"]')) setText(name, n.name);
    const drained = n.status === "drained";
    const drain = slot(tr, "drain-value");
    if (drain) {
      drain.value = drained ? "1" : "0";
      setText(slot(tr, "drain-button"), drained ? "Resume" : "Drain");
    }
    const edit = slot(tr, "edit-name");
    if (edit && !edit.closest("details").open) {
      edit.value = n.name;
      slot(tr, "edit-address").value = n.url;
      slot(tr, "edit-slots").value = String(n.slots);
      slot(tr, "edit-weight").value = n.display.weight;
    }
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
    const shown = state.display;
    setText(slot(document, "active-count"), shown.serving);
    setText(slot(document, "node-count"), nodes.length);
    setText(slot(document, "strategy"), state.strategy);
    setText(slot(document, "cache-hit-rate"), shown.cache_hit_rate || "");
    setText(slot(document, "total_active_requests"), state.total_active_requests);
    setText(slot(document, "capacity"), shown.capacity);
    renderQueue(state.queue, shown);
    setText(slot(document, "instance-count"), shown.instance_count);
    setText(slot(document, "instances"), shown.instances);
    const redis = slot(document, "redis");
    setText(redis, shown.redis);
    if (redis && state.cluster) redis.className = "hint redis-" + state.cluster.redis;
    setText(slot(document, "requests_served"), state.requests_served);
    const errors = slot(document, "errors");
    setText(errors, state.errors);
    errors.classList.toggle("has-errors", state.errors > 0);
    setOverall(shown.summary, shown.tone);
    const strategy = slot(document, "strategy-select");
    if (strategy && !strategy.dataset.dirty && document.activeElement !== strategy) {
      strategy.value = state.strategy;
    }
    renderTargets(nodes);
  }

  function renderQueue(queue, shown) {
    if (!queue) return;
    setText(slot(document, "queue-depth"), queue.depth);
    setText(slot(document, "queue-limit"), queue.limit);
    setText(slot(document, "queue-oldest"), shown.queue_oldest);
    setText(slot(document, "queue-average"), shown.queue_average);
    setText(slot(document, "queue-max-wait"), shown.queue_max_wait);
    const rejected = slot(document, "queue-rejected");
    setText(rejected, queue.rejected_total);
    rejected.classList.toggle("has-errors", queue.rejected_total > 0);
    const card = document.getElementById("queue");
    if (card) card.classList.toggle("queued", queue.depth > 0);
  }

  function renderTargets(nodes) {
    const select = slot(document, "pull-targets");
    if (!select) return;
    const key = JSON.stringify(nodes.map((n) => [n.id, n.name]));
    if (select.dataset.key === key) return;
    select.dataset.key = key;
    const chosen = select.value;
    const options = [el("option", "", "every serving node")];
    options[0].value = "all";
    for (const n of nodes) {
      const option = el("option", "", n.name);
      option.value = String(n.id);
      options.push(option);
    }
    select.replaceChildren(...options);
    select.value = options.some((o) => o.value === chosen) ? chosen : "all";
  }

  function setOverall(text, tone) {
    if (!overall) return;
    overall.className = `overall tone-${tone}`;
    setText(slot(overall, "summary"), text);
    const title = `${text} · Aivonx`;
    if (document.title !== title) document.title = title;
  }

  function render(state) {
    renderSummary(state);
    renderNodes(state.nodes);
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

  // -- forms ----------------------------------------------------------------
  // The same forms work without this script (POST, redirect, message); here
  // they are sent with fetch() asking for JSON, and the page stays put.
  const flashArea = document.getElementById("flash");
  let flashTimer = null;

  function flash(kind, text) {
    if (!flashArea) return;
    clearTimeout(flashTimer);
    const p = el("p", `flash ${kind}`, text);
    p.setAttribute("role", "alert");
    flashArea.replaceChildren(p);
    if (kind === "ok") flashTimer = setTimeout(() => p.remove(), 6000);
  }

  function showErrors(form, errors) {
    for (const slotEl of form.querySelectorAll("[data-error]")) {
      const keys = slotEl.dataset.error.split(" ");
      setText(slotEl, keys.map((k) => (errors || {})[k]).filter(Boolean).join("; "));
    }
  }

  function formBody(form) {
    const body = new URLSearchParams(new FormData(form));
    return { body, token: body.get("_xsrf") || "" };
  }

  async function answer(resp) {
    try {
      return await resp.json();
    } catch (err) {
      return { ok: false, message: `Aivonx answered ${resp.status}` };
    }
  }

  async function submit(form) {
    const buttons = form.querySelectorAll("button");
    buttons.forEach((b) => (b.disabled = true));
    const { body, token } = formBody(form);
    try {
      const resp = await fetch(form.action, {
        method: "POST",
        body,
        credentials: "same-origin",
        headers: { Accept: "application/json", "X-XSRFToken": token },
      });
      const result = await answer(resp);
      showErrors(form, result.errors);
      flash(result.ok ? "ok" : "error", result.message || "");
      if (result.ok) {
        if (form.hasAttribute("data-reset")) form.reset();
        if (form.hasAttribute("data-close")) form.closest("details").open = false;
        const strategy = slot(form, "strategy-select");
        if (strategy) delete strategy.dataset.dirty;
      }
    } catch (err) {
      flash("error", `Aivonx did not answer: ${err.message}`);
    } finally {
      buttons.forEach((b) => (b.disabled = false));
      poll();
    }
  }

  // -- pull with live progress ------------------------------------------------
  function bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KB", "MB", "GB", "TB"];
    const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1000)));
    return `${(n / 1000 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function pullRow(node) {
    const row = el("div", "pull-node");
    row.dataset.node = String(node.node_id);
    const head = el("div", "pull-head");
    const status = el("span", "pull-status", "waiting");
    const amount = el("span", "pull-amount num", "");
    head.append(el("strong", "", node.node), status, amount);
    const bar = el("progress");
    bar.max = 1;
    bar.value = 0;
    row.append(head, bar);
    return { row, status, amount, bar, layers: new Map() };
  }

  function pullLine(view, line) {
    if (line.error) {
      view.row.classList.add("failed");
      setText(view.status, line.error);
      return;
    }
    if (line.digest && line.total) {
      // A layer's bar only moves forward and never past its size, whatever
      // order or figures the lines arrive with.
      const before = view.layers.get(line.digest);
      const completed = Math.max(before ? before[0] : 0, Number(line.completed) || 0);
      view.layers.set(line.digest, [Math.min(completed, line.total), line.total]);
    }
    let done = 0;
    let total = 0;
    for (const [completed, size] of view.layers.values()) {
      done += completed;
      total += size;
    }
    if (total) {
      view.bar.value = done / total;
      setText(view.amount, `${bytes(done)} / ${bytes(total)}`);
    }
    if (line.status === "success") view.bar.value = 1;
    if (line.status) setText(view.status, line.status);
  }

  async function pull(form) {
    const area = document.getElementById("pull-progress");
    const button = form.querySelector("button");
    const { body, token } = formBody(form);
    showErrors(form, {});
    button.disabled = true;
    area.hidden = false;
    area.replaceChildren(el("p", "hint", `Pulling ${body.get("model")}…`));
    const views = new Map();
    const handle = (line) => {
      if (line.nodes) {
        const title = el("p", "pull-title");
        title.append("Pulling ", el("strong", "mono", line.model));
        area.replaceChildren(title);
        for (const node of line.nodes) {
          const view = pullRow(node);
          views.set(node.node_id, view);
          area.append(view.row);
        }
      } else if (line.done) {
        for (const result of line.results || []) {
          const view = views.get(result.node_id);
          if (!view) continue;
          if (result.error) {
            view.row.classList.add("failed");
            setText(view.status, result.error);
          } else {
            view.row.classList.add("succeeded");
            view.bar.value = 1;
            setText(view.status, "done");
          }
        }
        flash(line.error ? "error" : "ok",
          line.error || `Pulled ${line.model} on ${views.size} node${views.size === 1 ? "" : "s"}.`);
      } else if (views.has(line.node_id)) {
        pullLine(views.get(line.node_id), line);
      }
    };
    try {
      const resp = await fetch(form.action, {
        method: "POST",
        body,
        credentials: "same-origin",
        headers: { Accept: "application/x-ndjson, application/json", "X-XSRFToken": token },
      });
      if (!resp.ok || !(resp.headers.get("Content-Type") || "").includes("ndjson")) {
        const result = await answer(resp);
        showErrors(form, result.errors);
        flash("error", result.message || `Aivonx answered ${resp.status}`);
        area.hidden = true;
        return;
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const text = buffer.slice(0, end).trim();
          buffer = buffer.slice(end + 1);
          if (text) handle(JSON.parse(text));
        }
      }
    } catch (err) {
      flash("error", `The pull was interrupted: ${err.message}`);
    } finally {
      button.disabled = false;
      poll();
    }
  }

  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    if (!(form instanceof HTMLFormElement)) return;
    if (form.hasAttribute("data-pull")) {
      ev.preventDefault();
      pull(form);
    } else if (form.hasAttribute("data-enhance")) {
      ev.preventDefault();
      submit(form);
    }
  });
  document.addEventListener("change", (ev) => {
    if (ev.target.matches('[data-f="strategy-select"]')) ev.target.dataset.dirty = "1";
  });

  poll();
})();

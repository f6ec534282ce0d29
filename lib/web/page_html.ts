/**
 * The live page's document: HTML, CSS and one script, all inline (served by `page.ts`). Kept in
 * a module of its own so that `page.ts` stays readable; the script is plain JavaScript for any
 * current browser and is tested in Chromium (`tests/web_page_test.ts`).
 *
 * @module
 */

/** The page; `page.ts` sets `data-auth` on the body. */
export const PAGE_HTML: string = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>tcpnetlock: locks</title>
<link rel="icon" href="data:,">
<style>
:root {
  color-scheme: light dark;
  --bg: #ffffff; --fg: #1a1a1a; --muted: #595959; --card: #f5f6f7; --line: #d5d8dc;
  --accent: #0a58ca; --ok: #0b6b2b; --bad: #b3261e; --warn: #8a5300; --focus: #0a58ca;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #121416; --fg: #e8eaed; --muted: #a4a9ae; --card: #1d2024; --line: #33383d;
    --accent: #8ab4f8; --ok: #81c995; --bad: #f28b82; --warn: #fdd663; --focus: #8ab4f8;
  }
}
* { box-sizing: border-box; }
html { font-size: clamp(15px, 0.45vw + 12px, 24px); }
body {
  margin: 0; background: var(--bg); color: var(--fg);
  font: 1rem/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  font-variant-numeric: tabular-nums;
}
header, #counters, .toolbar, #locks, #empty, #auth { padding-inline: max(0.75rem, 2vw); }
header {
  display: flex; flex-wrap: wrap; align-items: baseline; gap: 0.25rem 1rem;
  padding-block: 0.75rem 0.25rem; border-bottom: 1px solid var(--line);
}
h1 { font-size: 1.25rem; margin: 0; }
#server { color: var(--muted); font-size: 0.85rem; }
#conn {
  margin: 0 0 0 auto; min-width: 13em; text-align: right; font-weight: 600;
  white-space: nowrap;
}
#conn::before { content: "\\25CF\\00A0"; }
#conn[data-state="live"] { color: var(--ok); }
#conn[data-state="disconnected"] { color: var(--bad); }
#conn[data-state="connecting"], #conn[data-state="locked"] { color: var(--warn); }
button, input {
  font: inherit; color: inherit; background: var(--bg); border: 1px solid var(--line);
  border-radius: 0.3rem; padding: 0.3rem 0.55rem;
}
button { cursor: pointer; background: var(--card); }
:focus-visible { outline: 3px solid var(--focus); outline-offset: 2px; }
#counters {
  display: grid; grid-template-columns: repeat(auto-fit, minmax(9.5rem, 1fr)); gap: 0.5rem;
  margin: 0.75rem 0 0; padding-block: 0; list-style: none;
}
.counter {
  background: var(--card); border: 1px solid var(--line); border-radius: 0.4rem;
  padding: 0.4rem 0.6rem; display: grid; grid-template-columns: 1fr auto; align-items: end;
}
.counter .label { color: var(--muted); font-size: 0.8rem; grid-column: 1 / 3; }
.counter .value { font-size: 1.35rem; font-weight: 650; min-width: 4ch; }
.spark { width: 5.5rem; height: 1.4rem; color: var(--accent); }
.spark polyline { fill: none; stroke: currentColor; stroke-width: 1.5; vector-effect: non-scaling-stroke; }
.toolbar {
  display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem 0.75rem; margin: 0.75rem 0;
}
.toolbar input { flex: 1 1 12rem; max-width: 30rem; }
#shown { color: var(--muted); font-size: 0.9rem; min-width: 10em; }
#locks {
  list-style: none; margin: 0 0 1.5rem; padding-block: 0;
  display: flex; flex-wrap: wrap; gap: 0.6rem; align-items: flex-start;
}
.lock {
  background: var(--card); border: 1px solid var(--line); border-radius: 0.45rem;
  padding: 0.5rem 0.7rem; min-width: 0; flex: 1 1 21rem; max-width: min(100%, 40rem);
  content-visibility: auto; contain-intrinsic-size: auto 7rem;
}
.lock > .top { display: flex; align-items: baseline; gap: 0.5rem; }
.lock h2 {
  font-size: 1.05rem; margin: 0; flex: 1; min-width: 0; overflow-wrap: anywhere;
  font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
}
.cap { font-size: 0.85rem; color: var(--muted); white-space: nowrap; }
.lock ul, .lock ol { list-style: none; margin: 0.3rem 0 0; padding: 0; }
.lock li { padding: 0.15rem 0; border-top: 1px dashed var(--line); overflow-wrap: anywhere; }
.lock p { margin: 0.3rem 0 0; }
.lock li:first-child { border-top: 0; }
.who { font-weight: 600; }
.who, .remote { display: inline-block; max-width: 100%; overflow-wrap: anywhere; }
.remote, .meta, .more, .brief, .free { color: var(--muted); font-size: 0.85rem; }
.remote { margin-left: 0.4rem; }
.meta { display: block; }
.mode { font-size: 0.75rem; border: 1px solid var(--line); border-radius: 0.25rem; padding: 0 0.25rem; margin-left: 0.3rem; }
.queue h3 { font-size: 0.85rem; margin: 0.4rem 0 0; color: var(--warn); }
.pos { display: inline-block; min-width: 2.2em; color: var(--muted); }
#empty { color: var(--muted); }
#main.stale #locks, #main.stale #counters { opacity: 0.55; }
#auth { max-width: 34rem; margin: 2rem 0; }
#auth label { display: block; font-weight: 600; margin-bottom: 0.4rem; }
#auth .row { display: flex; flex-wrap: wrap; gap: 0.5rem; }
#auth input { flex: 1 1 12rem; }
#auth-msg { color: var(--bad); min-height: 1.4em; margin: 0.4rem 0 0; }
.sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); white-space: nowrap; }
[hidden] { display: none !important; }
</style>
</head>
<body data-auth="none">
<header>
  <h1>tcpnetlock <span id="server"></span></h1>
  <p id="conn" role="status" aria-live="polite" data-state="connecting">Connecting…</p>
  <button type="button" id="forget" hidden>Forget token</button>
</header>
<form id="auth" hidden>
  <label for="token">This server needs its token to show the locks</label>
  <div class="row">
    <input id="token" type="password" autocomplete="current-password" required>
    <button type="submit">Show locks</button>
  </div>
  <p id="auth-msg" role="alert"></p>
</form>
<main id="main">
  <h2 class="sr">Counters</h2>
  <ul id="counters">
    <li class="counter"><span class="label">Connections</span><span class="value" id="v-connections">–</span><svg class="spark" id="s-connections" viewBox="0 0 100 20" preserveAspectRatio="none" aria-hidden="true"><polyline points=""/></svg></li>
    <li class="counter"><span class="label">Held names</span><span class="value" id="v-held">–</span><svg class="spark" id="s-held" viewBox="0 0 100 20" preserveAspectRatio="none" aria-hidden="true"><polyline points=""/></svg></li>
    <li class="counter"><span class="label">Waiting</span><span class="value" id="v-waiting">–</span><svg class="spark" id="s-waiting" viewBox="0 0 100 20" preserveAspectRatio="none" aria-hidden="true"><polyline points=""/></svg></li>
    <li class="counter"><span class="label">Grants/s</span><span class="value" id="v-grants">–</span><svg class="spark" id="s-grants" viewBox="0 0 100 20" preserveAspectRatio="none" aria-hidden="true"><polyline points=""/></svg></li>
    <li class="counter"><span class="label">Timeouts/s</span><span class="value" id="v-timeouts">–</span><svg class="spark" id="s-timeouts" viewBox="0 0 100 20" preserveAspectRatio="none" aria-hidden="true"><polyline points=""/></svg></li>
  </ul>
  <div class="toolbar" role="search">
    <label for="q">Filter</label>
    <input id="q" type="search" placeholder="lock name or client id  ( / )" autocomplete="off" aria-describedby="shown">
    <span id="shown"></span>
  </div>
  <h2 class="sr">Locks</h2>
  <ol id="locks"></ol>
  <p id="empty" hidden>No lock is held or waited on.</p>
</main>
<script>
(function () {
  "use strict";
  var KEY = "tcpnetlock.token";
  var WINDOW_MS = 300000;
  var SERIES = ["connections", "held", "waiting", "grants", "timeouts"];
  function $(id) { return document.getElementById(id); }
  var authRequired = document.body.getAttribute("data-auth") === "required";
  var list = $("locks"), conn = $("conn"), q = $("q"), shown = $("shown"), empty = $("empty");
  var main = $("main"), form = $("auth"), tokenInput = $("token"), authMsg = $("auth-msg");
  var forget = $("forget");
  var cards = new Map();
  var order = [];
  var visible = new Set();
  var offset = 0;
  var history = [];
  var filter = "";
  var current = null, retryTimer = 0, retryDelay = 500, watchdog = 0, live = false;
  var renders = 0;

  function now() { return Date.now() + offset; }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; });
  }
  function pad(n) { return n < 10 ? "0" + n : String(n); }
  function dur(ms) {
    var s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + " s";
    var m = Math.floor(s / 60);
    if (m < 60) return m + " m " + pad(s % 60) + " s";
    var h = Math.floor(m / 60);
    if (h < 24) return h + " h " + pad(m % 60) + " m";
    return Math.floor(h / 24) + " d " + pad(h % 24) + " h";
  }
  function since(iso) { var t = Date.parse(iso); return isNaN(t) ? now() : t; }
  function from(t) { return '<span class="t" data-from="' + t + '">' + dur(now() - t) + "</span>"; }
  function until(t) { return '<span class="t" data-to="' + t + '">' + dur(t - now()) + "</span>"; }
  function who(id) { return id ? esc(id) : "<i>no client id</i>"; }

  function topHtml(d) {
    return '<div class="top"><h2>' + esc(d.name) + '</h2><span class="cap" title="holders of limit">' +
      d.holders.length + " of " + d.limit + "</span></div>";
  }

  /** What an off-screen card holds: its name and counts (the details come when it shows). */
  function shellHtml(d) {
    var n = d.holders.length;
    return topHtml(d) + '<p class="brief">' + (n === 0 ? "free" : n + (n === 1 ? " holder" : " holders")) +
      (d.waiting ? " · " + d.waiting + " waiting" : "") + "</p>";
  }

  /** The height an off-screen card will take, in rem, so that nothing jumps when it shows. */
  function estimate(d) {
    var q = Math.min(d.queue.length, d.waiting);
    return 2.6 + Math.max(1, d.holders.length) * 2.4 +
      (d.waiting ? 1.6 + q * 2.4 + (d.waiting > q ? 1.4 : 0) : 0);
  }

  function cardHtml(d) {
    var h = topHtml(d);
    if (d.holders.length === 0) h += '<p class="free">free, handing over</p>';
    else {
      h += '<ul aria-label="Holders">';
      for (var i = 0; i < d.holders.length; i++) {
        var x = d.holders[i];
        h += '<li><span class="who">' + who(x.client_id) + "</span>" +
          (x.mode ? '<span class="mode">' + esc(x.mode) + "</span>" : "") +
          '<span class="remote">' + esc(x.remote) + '</span><span class="meta">held for ' +
          from(since(x.since)) + " · token " + esc(x.token) +
          (x.expires ? " · lease ends in " + until(x.expires) : "") + "</span></li>";
      }
      h += "</ul>";
    }
    if (d.waiting > 0) {
      h += '<div class="queue"><h3>' + d.waiting + (d.waiting === 1 ? " waiter" : " waiters") +
        '</h3><ol aria-label="Queue">';
      for (var j = 0; j < d.queue.length; j++) {
        var w = d.queue[j];
        h += '<li><span class="pos">#' + w.position + '</span><span class="who">' + who(w.client_id) +
          "</span>" + (w.mode ? '<span class="mode">' + esc(w.mode) + "</span>" : "") +
          '<span class="remote">' + esc(w.remote) + '</span><span class="meta">waiting for ' +
          from(since(w.since)) + (w.gives_up ? " · gives up in " + until(w.gives_up) : "") +
          "</span></li>";
      }
      if (d.waiting > d.queue.length) {
        h += '<li class="more">and ' + (d.waiting - d.queue.length) + " more</li>";
      }
      h += "</ol></div>";
    }
    return h;
  }

  function searchText(d) {
    var s = d.name;
    for (var i = 0; i < d.holders.length; i++) s += " " + d.holders[i].client_id;
    for (var j = 0; j < d.queue.length; j++) s += " " + d.queue[j].client_id;
    return s.toLowerCase();
  }

  function place(name) {
    var lo = 0, hi = order.length;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (order[mid] < name) lo = mid + 1; else hi = mid; }
    return lo;
  }

  function fill(c, d) {
    c.data = d;
    c.search = searchText(d);
    c.el.hidden = filter !== "" && c.search.indexOf(filter) < 0;
  }

  /** Shows a card in full (it is on screen), or as a light shell (off screen). */
  function draw(c) {
    if (visible.has(c.el)) {
      c.el.innerHTML = cardHtml(c.data);
      c.full = true;
    } else {
      c.el.innerHTML = shellHtml(c.data);
      c.el.style.containIntrinsicSize = "auto " + estimate(c.data).toFixed(1) + "rem";
      c.full = false;
    }
  }

  /** Updates the cards of known names in place; makes the new ones with one parse. */
  function upsertAll(ds) {
    var fresh = [], html = "", taken = new Set();
    for (var i = 0; i < ds.length; i++) {
      var d = ds[i], c = cards.get(d.name);
      if (c) {
        fill(c, d);
        draw(c);
      } else if (!taken.has(d.name)) {
        taken.add(d.name);
        fresh.push(d);
      }
    }
    if (fresh.length === 0) return;
    fresh.sort(function (a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; });
    // New cards start as shells; those on screen are drawn in full as soon as they show.
    for (var j = 0; j < fresh.length; j++) {
      html += '<li class="lock" style="contain-intrinsic-size: auto ' +
        estimate(fresh[j]).toFixed(1) + 'rem">' + shellHtml(fresh[j]) + "</li>";
    }
    var tpl = document.createElement("template");
    tpl.innerHTML = html;
    var els = Array.prototype.slice.call(tpl.content.children);
    // In name order: each goes before the first older card after it; runs go in together.
    var frag = null, fragNext = null;
    for (var k = 0; k < fresh.length; k++) {
      var el = els[k], name = fresh[k].name;
      el.setAttribute("data-name", name);
      var card = { el: el, search: "", data: null, full: false };
      cards.set(name, card);
      fill(card, fresh[k]);
      var p = place(name);
      order.splice(p, 0, name);
      var nextName = order[p + 1];
      var next = nextName === undefined ? null : cards.get(nextName).el;
      if (frag === null || next !== fragNext) {
        if (frag !== null) list.insertBefore(frag, fragNext);
        frag = document.createDocumentFragment();
        fragNext = next;
      }
      frag.appendChild(el);
      seen.observe(el);
    }
    if (frag !== null) list.insertBefore(frag, fragNext);
  }

  function remove(name) {
    var c = cards.get(name);
    if (!c) return;
    seen.unobserve(c.el);
    visible.delete(c.el);
    c.el.remove();
    cards.delete(name);
    var i = place(name);
    if (order[i] === name) order.splice(i, 1);
  }

  function clearAll() {
    cards.forEach(function (c) { seen.unobserve(c.el); });
    cards.clear();
    order = [];
    visible.clear();
    list.textContent = "";
    history = [];
    drawCounters();
    summary();
  }

  function summary() {
    var n = 0;
    cards.forEach(function (c) { if (!c.el.hidden) n++; });
    shown.textContent = filter === ""
      ? cards.size + (cards.size === 1 ? " lock" : " locks")
      : n + " of " + cards.size + " locks match";
    empty.hidden = !live || cards.size > 0;
  }

  function applyFilter() {
    filter = q.value.trim().toLowerCase();
    cards.forEach(function (c) { c.el.hidden = filter !== "" && c.search.indexOf(filter) < 0; });
    summary();
  }

  function fmt(key, v) {
    if (v === undefined) return "–";
    if (key === "grants" || key === "timeouts") return v < 10 ? v.toFixed(1) : String(Math.round(v));
    return String(v);
  }

  function drawCounters() {
    var last = history[history.length - 1];
    var end = last ? last.t : 0;
    // The x axis spans what the history has, from 10 s to five minutes.
    var span = history.length ? Math.min(WINDOW_MS, Math.max(10000, end - history[0].t)) : WINDOW_MS;
    for (var k = 0; k < SERIES.length; k++) {
      var key = SERIES[k];
      $("v-" + key).textContent = fmt(key, last && last[key]);
      var max = 1, pts = [];
      for (var i = 0; i < history.length; i++) if (history[i][key] > max) max = history[i][key];
      for (var j = 0; j < history.length; j++) {
        var s = history[j];
        var x = 100 - (end - s.t) / span * 100;
        if (x < 0) continue;
        pts.push(x.toFixed(1) + "," + (19 - s[key] / max * 18).toFixed(1));
      }
      $("s-" + key).firstElementChild.setAttribute("points", pts.join(" "));
    }
  }

  function tick() {
    visible.forEach(function (el) {
      var ts = el.querySelectorAll(".t");
      for (var i = 0; i < ts.length; i++) {
        var t = ts[i], f = t.getAttribute("data-from");
        t.textContent = f !== null ? dur(now() - Number(f)) : dur(Number(t.getAttribute("data-to")) - now());
      }
    });
  }

  // Which cards are on screen (with a margin): only those are drawn in full and ticked.
  var seen = new IntersectionObserver(function (entries) {
    var t0 = performance.now(), drawn = 0;
    for (var i = 0; i < entries.length; i++) {
      var el = entries[i].target;
      if (!entries[i].isIntersecting) { visible.delete(el); continue; }
      visible.add(el);
      var c = cards.get(el.getAttribute("data-name"));
      if (c && c.el === el && !c.full) { draw(c); drawn++; }
    }
    if (drawn > 0) {
      void list.offsetHeight;
      performance.measure("tnl-render", { start: t0, end: performance.now(), detail: "show" });
    }
  }, { rootMargin: "200px 0px" });

  function handle(event, data) {
    if (typeof data.t === "number") offset = data.t - Date.now();
    if (event === "reset") {
      clearAll();
      history = data.history || [];
      $("server").textContent = (data.server.version ? "v" + data.server.version + " · " : "") +
        data.server.store + " store";
      retryDelay = 500;
      live = true;
      main.classList.remove("stale");
      setState("live", "Live");
    } else if (event === "update") {
      for (var i = 0; i < data.remove.length; i++) remove(data.remove[i]);
      upsertAll(data.upsert);
      summary();
    } else if (event === "stats") {
      history.push(data);
      while (history.length > 0 && history[0].t < data.t - WINDOW_MS) history.shift();
      drawCounters();
    }
  }

  function dispatch(block) {
    var event = "message", data = "";
    var lines = block.split("\\n");
    for (var i = 0; i < lines.length; i++) {
      var l = lines[i];
      if (l.indexOf("event: ") === 0) event = l.slice(7);
      else if (l.indexOf("data: ") === 0) data += (data ? "\\n" : "") + l.slice(6);
    }
    if (!data) return;
    var t0 = performance.now();
    var parsed = JSON.parse(data);
    handle(event, parsed);
    if (event === "stats") return;
    // The measure the tests read: parsing, the DOM work and the layout it forces.
    void list.offsetHeight;
    performance.measure("tnl-render", {
      start: t0, end: performance.now(), detail: parsed.snapshot ? "snapshot" : event
    });
    if (++renders % 2000 === 0) performance.clearMeasures("tnl-render");
  }

  function setState(state, text) {
    conn.setAttribute("data-state", state);
    if (conn.textContent !== text) conn.textContent = text;
    document.body.setAttribute("data-state", state);
  }

  function arm(ctl) {
    clearTimeout(watchdog);
    watchdog = setTimeout(function () { ctl.abort(); }, 5000);
  }

  function lost(ctl) {
    clearTimeout(watchdog);
    if (current !== ctl) return;
    current = null;
    live = false;
    main.classList.add("stale");
    setState("disconnected", "Disconnected: reconnecting…");
    retryTimer = setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 3000);
  }

  function askToken(message) {
    if (current) current.abort();
    current = null;
    live = false;
    clearAll();
    main.hidden = true;
    form.hidden = false;
    forget.hidden = true;
    authMsg.textContent = message;
    setState("locked", "Token needed");
    tokenInput.focus();
  }

  async function connect() {
    clearTimeout(retryTimer);
    var token = sessionStorage.getItem(KEY) || "";
    if (authRequired && !token) { askToken(""); return; }
    if (current) current.abort();
    var ctl = new AbortController();
    current = ctl;
    var headers = { accept: "text/event-stream" };
    if (token) headers.authorization = "Bearer " + token;
    var res;
    try {
      res = await fetch("events", { headers: headers, cache: "no-store", signal: ctl.signal });
    } catch (e) {
      lost(ctl);
      return;
    }
    if (res.status === 401) {
      sessionStorage.removeItem(KEY);
      current = null;
      askToken(token ? "The server refused that token." : "");
      return;
    }
    if (!res.ok || !res.body) { lost(ctl); return; }
    form.hidden = true;
    main.hidden = false;
    forget.hidden = !token;
    var reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    var buf = "";
    arm(ctl);
    try {
      for (;;) {
        var r = await reader.read();
        if (r.done) break;
        arm(ctl);
        buf += r.value;
        var i;
        while ((i = buf.indexOf("\\n\\n")) >= 0) {
          var block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          if (current === ctl) dispatch(block);
        }
      }
    } catch (e) {
      // the connection broke, or the watchdog aborted it
    }
    lost(ctl);
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var t = tokenInput.value.trim();
    if (!t) return;
    sessionStorage.setItem(KEY, t);
    tokenInput.value = "";
    authMsg.textContent = "";
    setState("connecting", "Connecting…");
    connect();
  });
  forget.addEventListener("click", function () {
    sessionStorage.removeItem(KEY);
    askToken("");
  });
  q.addEventListener("input", applyFilter);
  q.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && q.value) { q.value = ""; applyFilter(); }
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "/" && document.activeElement !== q && document.activeElement !== tokenInput) {
      e.preventDefault();
      q.focus();
    }
  });
  setInterval(tick, 1000);
  summary();
  connect();
})();
</script>
</body>
</html>
`;

// The changes page: long-polls /ui/changes/poll (the session cookie authenticates it) and
// puts new rows, rendered and escaped by the server, at the top of the table.
"use strict";
(function () {
  const table = document.getElementById("feed");
  if (!table) return;
  const body = document.getElementById("feed-rows");
  const status = document.getElementById("feed-status");
  const base = table.dataset.poll;
  let after = Number(table.dataset.after || "0");
  let failures = 0;
  const WAIT_S = 25;
  const MAX_ROWS = 500;

  function say(text) { status.textContent = text; }

  function url() {
    const sep = base.indexOf("?") >= 0 ? "&" : "?";
    return base + sep + "after=" + after + "&wait=" + WAIT_S;
  }

  function insert(html) {
    const tpl = document.createElement("template");
    tpl.innerHTML = html;  // rows rendered by the server's templates (autoescaped)
    body.insertBefore(tpl.content, body.firstChild);
    while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
    const empty = document.getElementById("feed-empty");
    if (empty) empty.remove();
  }

  async function poll() {
    for (;;) {
      if (document.hidden) {
        await new Promise((resolve) => document.addEventListener("visibilitychange", resolve, { once: true }));
        continue;
      }
      try {
        const resp = await fetch(url(), { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" });
        if (resp.status === 401) {
          say("Your session ended: reload the page to sign in again.");
          return;
        }
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        const data = await resp.json();
        failures = 0;
        if (data.count > 0) {
          insert(data.html);
          say(data.count + (data.count === 1 ? " new change" : " new changes") + " at " + new Date().toLocaleTimeString() + ".");
        }
        after = data.next_after;
      } catch (err) {
        failures += 1;
        say("Lost contact with the server; retrying… (" + err.message + ")");
        await new Promise((resolve) => setTimeout(resolve, Math.min(30000, 1000 * 2 ** failures)));
      }
    }
  }
  poll();
})();

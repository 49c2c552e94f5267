/**
 * The demo's live page: one self-contained HTML document (no build step, no
 * external assets). It is a module rather than a file so that the server
 * needs no read permission and works when imported by URL.
 *
 * @module
 */

/** The page served at `GET /`. */
export const PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SSE broker</title>
<style>
  :root { color-scheme: light dark; --accent: #0b62c4; --ok: #137333; --warn: #a15c00; }
  body { font: 16px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 46rem; padding: 1rem; }
  header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: baseline; }
  h1 { font-size: 1.4rem; margin: 0; }
  #state { font-weight: 600; }
  #state[data-state="open"] { color: var(--ok); }
  #state[data-state="connecting"], #state[data-state="reconnecting"] { color: var(--warn); }
  #clock { font: 600 2rem/1.2 ui-monospace, monospace; margin: .75rem 0; }
  form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: end; margin: 1rem 0; }
  label { display: flex; flex-direction: column; font-size: .85rem; }
  input, button { font: inherit; padding: .35rem .5rem; }
  button { background: var(--accent); color: #fff; border: 0; border-radius: .25rem; cursor: pointer; }
  button:focus-visible, input:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
  #log { list-style: none; padding: 0; margin: 0; max-height: 50vh; overflow-y: auto;
         font: .9rem/1.4 ui-monospace, monospace; border-top: 1px solid #8884; }
  #log li { padding: .25rem 0; border-bottom: 1px solid #8884; overflow-wrap: anywhere; }
  #log .meta { opacity: .75; }
</style>
</head>
<body>
<header>
  <h1>SSE broker</h1>
  <span>Stream: <span id="state" data-state="connecting" role="status">connecting</span></span>
  <span>Clients: <span id="clients">?</span></span>
</header>
<div id="clock" aria-live="off">--:--:--</div>
<form id="publish">
  <label>Data <input name="data" required autocomplete="off"></label>
  <button>Publish</button>
</form>
<h2>Events</h2>
<ol id="log" aria-live="polite"></ol>
<script>
  const state = document.getElementById("state");
  const log = document.getElementById("log");
  const clock = document.getElementById("clock");
  const setState = (name) => { state.dataset.state = name; state.textContent = name; };
  const show = (event) => {
    const item = document.createElement("li");
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = "#" + (event.lastEventId || "-") + " " + event.type + " ";
    item.append(meta, event.data);
    log.prepend(item);
    while (log.children.length > 200) log.lastChild.remove();
  };
  const source = new EventSource("/events");
  source.onopen = () => setState("open");
  source.onerror = () => setState(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  source.onmessage = show;
  source.addEventListener("tick", (event) => {
    clock.textContent = new Date(event.data).toLocaleTimeString();
  });
  source.addEventListener("gap", show);
  document.getElementById("publish").addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const form = new FormData(submit.target);
    const body = { data: form.get("data") };
    const response = await fetch("/publish", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) alert((await response.json()).error);
    else submit.target.reset();
  });
  const refreshStats = async () => {
    try {
      const stats = await (await fetch("/stats")).json();
      document.getElementById("clients").textContent = stats.clients;
    } catch { /* the server may be restarting */ }
  };
  refreshStats();
  setInterval(refreshStats, 2000);
</script>
</body>
</html>
`;

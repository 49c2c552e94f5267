/**
 * The demo's live page: one self-contained HTML document (no build step, no
 * external assets, works offline). It is a module rather than a file so the
 * server needs no read permission and still works when imported by URL.
 *
 * @module
 */

/** What the page needs to know about the server that serves it. */
export interface PageConfig {
  /** The `retry:` the server sends, for the reconnection countdown. */
  retryMs: number;
  /** Whether publishing needs a token, to show the token field. */
  publishToken: boolean;
  /** The heartbeat interval, to tell how long a stream can stay silent. */
  heartbeatMs: number;
  /**
   * The cookie that carries a signed token (JWT), when the server takes
   * them: the page then asks for one and sets it. Absent otherwise.
   */
  jwtCookie?: string;
}

/** The page served at `GET /`. */
export function renderPage(config: PageConfig): string {
  // `<` escaped so that nothing in the JSON can close the script element.
  const json = JSON.stringify(config).replaceAll("<", "\\u003c");
  return PAGE.replace("{{config}}", json);
}

const PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SSE broker: live</title>
<link rel="icon" href="data:,">
<style>
  :root {
    color-scheme: light dark;
    --bg: #fff; --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --card: #f6f8fa;
    --accent: #0550ae; --ok: #116329; --warn: #8a4600; --bad: #a40e26;
  }
  @media (prefers-color-scheme: dark) {
    :root {
      --bg: #0d1117; --fg: #e6edf3; --muted: #9da7b3; --line: #30363d; --card: #161b22;
      --accent: #79c0ff; --ok: #56d364; --warn: #e3b341; --bad: #ff7b72;
    }
  }
  * { box-sizing: border-box; }
  [hidden] { display: none !important; }
  body { margin: 0; background: var(--bg); color: var(--fg);
         font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; }
  main { max-width: 64rem; margin: 0 auto; padding: 1rem; display: grid; gap: 1rem;
         grid-template-columns: minmax(0, 1fr); }
  @media (min-width: 48rem) { main { grid-template-columns: 20rem minmax(0, 1fr); }
                              .wide { grid-column: 1 / -1; } }
  header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: center; }
  h1 { font-size: 1.35rem; margin: 0 auto 0 0; }
  h2 { font-size: 1rem; margin: 0 0 .5rem; }
  section, fieldset { background: var(--card); border: 1px solid var(--line); border-radius: .5rem;
                      padding: .75rem 1rem; margin: 0; min-width: 0; }
  .pill { display: inline-flex; gap: .4rem; align-items: center; font-weight: 600; }
  .dot { width: .7rem; height: .7rem; border-radius: 50%; background: var(--muted); }
  [data-state="open"] .dot { background: var(--ok); }
  [data-state="connecting"] .dot, [data-state="reconnecting"] .dot { background: var(--warn); }
  [data-state="closed"] .dot { background: var(--bad); }
  #clock { font: 600 2.2rem/1.2 ui-monospace, SFMono-Regular, Menlo, monospace; }
  .muted { color: var(--muted); font-size: .875rem; }
  #notice:empty { display: none; }
  #notice { border-left: 4px solid var(--accent); padding: .5rem .75rem; background: var(--card); }
  form { display: grid; gap: .6rem; }
  label { display: grid; gap: .2rem; font-size: .875rem; font-weight: 600; }
  input { font: inherit; padding: .4rem .5rem; border: 1px solid var(--line); border-radius: .3rem;
          background: var(--bg); color: var(--fg); width: 100%; }
  .check { display: flex; gap: .4rem; align-items: center; font-weight: 400; }
  .check input { width: auto; }
  button { font: inherit; font-weight: 600; padding: .45rem .9rem; border: 0; border-radius: .3rem;
           background: var(--accent); color: var(--bg); cursor: pointer; justify-self: start; }
  :focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
  #publish-error, #sign-in-error { color: var(--bad); font-size: .875rem; margin: 0; }
  #sign-in-status { font-size: .875rem; margin: 0; }
  .log { max-height: 60vh; overflow: auto; border: 1px solid var(--line); border-radius: .3rem; }
  table { width: 100%; border-collapse: collapse; font: .875rem/1.4 ui-monospace, monospace; }
  th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line);
           vertical-align: top; }
  th { position: sticky; top: 0; background: var(--card); }
  td.data { overflow-wrap: anywhere; white-space: pre-wrap; }
  tr.replayed td:first-child { border-left: 3px solid var(--warn); }
  tr.control td { color: var(--accent); }
  tr.private td.data::after { content: " (private)"; color: var(--muted); }
  #check-result ul { margin: .25rem 0 0; padding-left: 1.2rem; }
  #check-result .problem strong { color: var(--bad); }
</style>
</head>
<body>
<main>
  <header class="wide">
    <h1>SSE broker</h1>
    <span id="state" class="pill" data-state="connecting" role="status">
      <span class="dot" aria-hidden="true"></span><span id="state-text">connecting</span>
    </span>
    <span class="muted">clients: <strong id="clients">?</strong></span>
    <span class="muted">last id: <strong id="last-id">none</strong></span>
  </header>
  <p id="notice" class="wide" role="status" aria-live="polite"></p>

  <div style="display: grid; gap: 1rem; align-content: start;">
    <section aria-labelledby="clock-title">
      <h2 id="clock-title">Server time</h2>
      <div id="clock" aria-live="off">--:--:--</div>
      <div class="muted">published by the ticker on topic <code>time</code></div>
    </section>

    <form id="sign-in" hidden>
      <fieldset>
        <legend>Signed token</legend>
        <label>JWT <input name="jwt" type="password" autocomplete="off"></label>
        <button>Use token</button>
        <p id="sign-in-error" role="alert"></p>
        <p id="sign-in-status" role="status"></p>
      </fieldset>
    </form>

    <form id="subscription" aria-describedby="subscription-help">
      <fieldset>
        <legend>Subscription</legend>
        <label>Topics <input name="topics" placeholder="all topics" autocomplete="off"></label>
        <label>Event names <input name="events" value="quote" autocomplete="off"></label>
        <p id="subscription-help" class="muted" style="margin: 0">
          Comma-separated. No topic receives every topic. The page hears only the event names
          it listens for: unnamed events, tick, these, and those published here.
        </p>
        <label class="check"><input type="checkbox" name="ticks"> Log ticks too</label>
        <button>Subscribe</button>
      </fieldset>
    </form>

    <form id="publish">
      <fieldset>
        <legend>Publish</legend>
        <label>Data <input name="data" required autocomplete="off"></label>
        <label>Event name <input name="event" placeholder="message" autocomplete="off"></label>
        <label>Topic <input name="topic" placeholder="none" autocomplete="off"></label>
        <label class="check" id="private-field" hidden><input type="checkbox" name="private">
          Private: only subscribers granted its topic</label>
        <label id="token-field" hidden>Token
          <input name="token" type="password" autocomplete="current-password"></label>
        <button>Publish</button>
        <p id="publish-error" role="alert"></p>
      </fieldset>
    </form>
  </div>

  <section aria-labelledby="check-title" class="wide">
    <h2 id="check-title">Check my connection</h2>
    <p class="muted" style="margin: 0 0 .5rem">Streams timed probes through every proxy between this
      server and this browser, and says what the path does to an event stream.</p>
    <button id="check-button" type="button">Check my connection</button>
    <div id="check-result" role="status" aria-live="polite"></div>
  </section>

  <section aria-labelledby="log-title">
    <h2 id="log-title">Events <span class="muted" id="log-count">(0)</span></h2>
    <div class="log" tabindex="0" aria-label="received events">
      <table>
        <thead><tr><th scope="col">id</th><th scope="col">event</th><th scope="col">topic</th>
          <th scope="col">data</th></tr></thead>
        <tbody id="log"></tbody>
      </table>
    </div>
  </section>
</main>
<script id="config" type="application/json">{{config}}</script>
<script type="module">
import { connect } from "/client.js";
const config = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const MAX_ROWS = 500;

let stream = null;        // the connection (client.js), shared with this browser's other tabs
let topics = [];          // the current subscription; empty means all
let logTicks = false;
let eventNames = ["quote"]; // named events listened for, besides tick and those published here
let countdown = null;
let wasOpen = false;      // opened before, so the next open is a reconnect
let replaying = false;    // between a reconnect and the "replayed" event
let gap = false;          // the server said events may be missing before the replay
const listening = new Set();
const privateIds = new Set(); // events this page published privately: the stream cannot say
let shown = 0;

function setState(state, text) {
  $("state").dataset.state = state;
  $("state-text").textContent = text ?? state;
}

function startCountdown(ms) {
  clearInterval(countdown);
  const until = Date.now() + ms;
  const render = () => {
    const left = Math.max(0, until - Date.now());
    setState("reconnecting", left > 0 ? "reconnecting in " + (left / 1000).toFixed(1) + " s"
                                      : "reconnecting");
  };
  render();
  countdown = setInterval(render, 100);
}

function addRow(event, kind) {
  const row = document.createElement("tr");
  row.dataset.id = event.id;
  row.dataset.event = event.type;
  if (kind) row.className = kind;
  if (privateIds.has(event.id)) row.classList.add("private");
  for (const [text, className] of [[event.id, ""], [event.type, ""], [event.topics.join(", "), ""],
                                   [event.data, "data"]]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    if (className) cell.className = className;
    row.append(cell);
  }
  if (kind === "control") row.firstChild.textContent = "";
  $("log").prepend(row);
  while ($("log").children.length > MAX_ROWS) $("log").lastChild.remove();
  $("log-count").textContent = "(" + ++shown + ")";
}

function onEvent(event) {
  $("last-id").textContent = event.id || "none";
  addRow(event, replaying ? "replayed" : "");
}

function listen(name) {
  // message, tick, gap and replayed have their own listeners.
  if (!name || listening.has(name) || !stream) return;
  if (["message", "tick", "gap", "replayed"].includes(name)) return;
  listening.add(name);
  stream.on(name, onEvent);
}

function subscribe() {
  stream?.close();
  listening.clear();
  wasOpen = false;
  setState("connecting");
  // One stream for every tab of this page in this browser; each tab gets its own topics.
  stream = connect("/events", {
    topics,
    token: token ?? undefined,
    shared: !token, // a page opened with its own ?token= shares no stream with others
    retry: config.retryMs,
    onStateChange({ state, reason, retryIn }) {
      clearInterval(countdown);
      if (state === "open") {
        setState("open");
        replaying = wasOpen;
        wasOpen = true;
        refreshClients(); // at once, not at the next interval
      } else if (state === "closed") setState("closed", "closed (" + reason + "): reload to retry");
      else if (retryIn !== undefined) startCountdown(retryIn);
      else setState(wasOpen ? "reconnecting" : "connecting");
    },
  });
  stream.on("message", onEvent);
  stream.on("tick", (event) => {
    $("clock").textContent = new Date(event.data).toLocaleTimeString();
    $("last-id").textContent = event.id;
    if (logTicks) addRow(event, replaying ? "replayed" : "");
  });
  stream.on("gap", (event) => {
    gap = true;
    addRow(event, "control");
  });
  stream.on("replayed", (event) => {
    replaying = false;
    const { count } = JSON.parse(event.data);
    $("notice").textContent = "Resumed at " + new Date().toLocaleTimeString() + ": replayed " +
      count + (count === 1 ? " missed event." : " missed events.") +
      (gap ? " The server no longer had every event since this page's last one" +
        " (it restarted, or its history is shorter), so some may be missing." : "");
    $("notice").dataset.replayed = count;
    gap = false;
  });
  for (const name of (localStorage.getItem("sse-events") ?? "").split(",")) listen(name);
  for (const name of eventNames) listen(name);
}

$("subscription").addEventListener("submit", (submit) => {
  submit.preventDefault();
  const form = new FormData(submit.target);
  topics = String(form.get("topics")).split(",").map((t) => t.trim()).filter(Boolean);
  logTicks = form.get("ticks") === "on";
  eventNames = String(form.get("events")).split(",").map((e) => e.trim()).filter(Boolean);
  subscribe();
});

$("publish").addEventListener("submit", async (submit) => {
  submit.preventDefault();
  const form = new FormData(submit.target);
  const body = { data: form.get("data") };
  const event = String(form.get("event")).trim();
  const topic = String(form.get("topic")).trim();
  if (event) {
    body.event = event;
    // Show our own named events, here and after reloads.
    listen(event);
    const names = new Set((localStorage.getItem("sse-events") ?? "").split(",").filter(Boolean));
    localStorage.setItem("sse-events", [...names.add(event)].join(","));
  }
  if (topic) body.topic = topic;
  if (form.get("private") === "on") body.private = true;
  const headers = { "content-type": "application/json" };
  const secret = form.get("token");
  if (secret) headers.authorization = "Bearer " + secret;
  $("publish-error").textContent = "";
  try {
    const response = await fetch("/publish", { method: "POST", headers, body: JSON.stringify(body) });
    if (!response.ok) {
      $("publish-error").textContent = (await response.json()).error;
      return;
    }
    if (body.private) {
      const { id } = await response.json();
      privateIds.add(id);
      // The event may have come through the stream before this answer.
      document.querySelector('#log tr[data-id="' + CSS.escape(id) + '"]')?.classList.add("private");
    }
    submit.target.elements.data.value = "";
    submit.target.elements.data.focus();
  } catch {
    $("publish-error").textContent = "The server cannot be reached.";
  }
});

// The path check: /probe sends a probe every 250 ms, stays silent for as
// long as a stream can (two heartbeat intervals), then says done.
async function checkConnection() {
  const url = new URL("/probe?at=" + Date.now(), location.href).href;
  const seconds = Math.ceil((1750 + 2 * config.heartbeatMs) / 1000);
  $("check-button").disabled = true;
  $("check-result").textContent = "Checking: this takes about " + seconds + " s.";
  const problems = [];
  const notes = [];
  const lags = []; // arrival on this clock minus sending on the server's: only differences count
  let done = false;
  let lastArrival = performance.now();
  let encoding = null;
  try {
    const response = await fetch(url, { cache: "no-store" });
    encoding = response.headers.get("content-encoding");
    if (!response.ok) throw new Error("HTTP " + response.status);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    for (;;) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      lastArrival = performance.now();
      text += value;
      let end;
      while ((end = text.indexOf("\\n\\n")) !== -1) {
        const block = text.slice(0, end);
        text = text.slice(end + 2);
        const event = /^event: (.*)$/m.exec(block)?.[1];
        if (event === "probe") lags.push(Date.now() - JSON.parse(/^data: (.*)$/m.exec(block)[1]).sentMs);
        if (event === "done") done = true;
      }
    }
  } catch (error) {
    if (/^HTTP/.test(error.message)) problems.push(["The probe got " + error.message + ".",
      "Check that this server, not another, answers /probe."]);
  }
  if (!done && problems.length === 0) {
    const silent = ((performance.now() - lastArrival) / 1000).toFixed(1);
    problems.push(["The connection was cut after " + silent + " s without data.",
      "A proxy closes idle connections sooner than the heartbeat keeps them busy: set HEARTBEAT_MS " +
      "below that (it is " + config.heartbeatMs / 1000 + " s), or raise the proxy's idle timeout " +
      "(nginx: proxy_read_timeout)."]);
  }
  const spread = lags.length > 0 ? Math.max(...lags) - Math.min(...lags) : 0;
  if (spread > 1000) {
    problems.push(["A proxy buffers the stream: probes sent 250 ms apart arrived in bursts, up to " +
      Math.round(spread) + " ms late.",
      "Turn response buffering off for event streams (nginx: proxy_buffering off; the server sends " +
      "X-Accel-Buffering: no, which nginx honours unless told to ignore it)."]);
  }
  // The browser adds the fetch's timing entry a moment after the body ends.
  let timing;
  for (let wait = 0; wait < 20 && !(timing = performance.getEntriesByName(url).at(-1)); wait++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const shrunk = timing && timing.encodedBodySize > 0 && timing.encodedBodySize < timing.decodedBodySize;
  if (encoding || shrunk) {
    problems.push(["The stream is compressed" + (encoding ? " (" + encoding + ")" : "") + ".",
      "Compression holds events back until a block fills: exclude text/event-stream from " +
      "compression at the proxy (the server sends Cache-Control: no-transform)."]);
  }
  if (timing?.nextHopProtocol === "http/1.1") {
    notes.push(["HTTP/1.1: a browser opens at most six connections to one origin, and each open " +
      "stream holds one, so a seventh tab's stream waits.",
      "Serve over HTTP/2 (a TLS proxy in front) to lift the limit."]);
  }
  const result = $("check-result");
  result.replaceChildren();
  const verdict = document.createElement("p");
  verdict.textContent = problems.length === 0
    ? "No problem found: events reach this browser as they are sent."
    : "Found " + problems.length + (problems.length === 1 ? " problem:" : " problems:");
  const list = document.createElement("ul");
  for (const [items, kind] of [[problems, "problem"], [notes, "note"]]) {
    for (const [what, fix] of items) {
      const item = document.createElement("li");
      item.className = kind;
      const title = document.createElement("strong");
      title.textContent = what;
      item.append(title, " " + fix);
      list.append(item);
    }
  }
  result.append(verdict, list);
  $("check-button").disabled = false;
}
$("check-button").addEventListener("click", checkConnection);

async function refreshClients() {
  if (stream?.state !== "open") return; // no noise while the server is away
  try {
    const stats = await (await fetch("/stats")).json();
    $("clients").textContent = stats.clients;
  } catch {
    // the server went away between the check and the request; the stream will say so
  }
}

$("token-field").hidden = !config.publishToken;
// With signed tokens, the cookie carries the token: the stream's fetch sends
// it, and so does the fetch of a publish on this origin.
$("sign-in").hidden = !config.jwtCookie;
$("private-field").hidden = !config.jwtCookie;
// The server sets the cookie (HttpOnly: no script of this page can read it)
// once it has checked the token.
$("sign-in").addEventListener("submit", async (submit) => {
  submit.preventDefault();
  const value = String(new FormData(submit.target).get("jwt")).trim();
  $("sign-in-error").textContent = "";
  $("sign-in-status").textContent = "";
  try {
    const response = await fetch("/session", {
      method: "POST",
      headers: { authorization: "Bearer " + value },
    });
    if (!response.ok) {
      $("sign-in-error").textContent = (await response.json()).error;
      return;
    }
  } catch {
    $("sign-in-error").textContent = "The server cannot be reached.";
    return;
  }
  stream.reconnect(); // the stream of every tab, with the new cookie
  $("sign-in-status").textContent = "Signed in: the stream carries the token.";
});
subscribe();
setInterval(refreshClients, 2000);
</script>
</body>
</html>
`;

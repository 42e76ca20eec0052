// The loopstream inspector page. Every text from the log (goals, model replies, tool
// results) is put on the page with textContent / text nodes, never parsed as markup:
// this file never uses innerHTML. The Content-Security-Policy allows this script only.
"use strict";

const TOKEN_KEY = "loopstream-token";
(function keepToken() {
  const url = new URL(location.href);
  const token = url.searchParams.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
})();

function headers(json) {
  const h = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h["Authorization"] = "Bearer " + token;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, {method, headers: headers(body !== undefined),
                                 body: body === undefined ? undefined : JSON.stringify(body)});
  let data = null;
  try { data = await res.json(); } catch (e) { data = {error: res.statusText}; }
  if (!res.ok) {
    const err = new Error(data && data.error ? data.error : res.statusText);
    err.status = res.status; err.data = data;
    throw err;
  }
  return data;
}

// el("td", {className: "x"}, "text", child): attributes are set as properties; strings become text nodes.
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
function short(text, n) { text = String(text || ""); return text.length > n ? text.slice(0, n) + "…" : text; }
function badge(status) {
  return el("span", {className: "status status-" + String(status).replace(/[^a-z]+/gi, "-"),
                     dataset: {status: String(status)}}, String(status));
}
function when(ms) { try { return new Date(ms).toLocaleString(); } catch (e) { return String(ms); } }
function showError(err) {
  const box = document.getElementById("error");
  box.textContent = String(err && err.message ? err.message : err);
  box.hidden = false;
  setTimeout(() => { box.hidden = true; }, 6000);
}
function go(hash) { if (location.hash === hash) route(); else location.hash = hash; }

// -- the session list -------------------------------------------------------------------
let current = null;  // the session shown
async function refreshList() {
  const q = document.getElementById("search").value;
  const status = document.getElementById("status-filter").value;
  const params = new URLSearchParams({q, status});
  let data;
  try { data = await api("GET", "/api/sessions?" + params); } catch (e) { showError(e); return; }
  const list = clear(document.getElementById("sessions"));
  document.getElementById("count").textContent = `${data.matched} of ${data.total} sessions`;
  for (const s of data.sessions) {
    list.appendChild(el("li", {className: s.session_id === current ? "selected" : "",
                               dataset: {session: s.session_id}, onclick: () => go("#/s/" + s.session_id)},
      badge(s.status), " ", el("span", {className: "dim"}, s.session_id.slice(0, 12), " · ", when(s.created_ms)),
      s.parent ? el("span", {className: "dim"}, ` · ${s.parent.kind} of ${s.parent.session_id.slice(0, 8)}`) : null,
      el("span", {className: "goal", title: short(s.goal, 2000)}, short(s.goal, 200) || "(no goal)")));
  }
}

// -- one session ------------------------------------------------------------------------
let streamAbort = null;
const PAYLOAD_MAX = 20000;

function eventRow(e, sid) {
  const row = el("tr", {className: "event", dataset: {seq: String(e.seq), type: e.type}},
    el("td", {}, String(e.seq)), el("td", {className: "dim"}, new Date(e.time).toLocaleTimeString()),
    el("td", {}, e.type), el("td", {className: "dim"}, short(e.actor, 40)),
    el("td", {className: "summary"}, e.summary),
    el("td", {}, el("button", {className: "fork", title: "fork a new session after this event",
                              onclick: (ev) => { ev.stopPropagation(); forkAt(sid, e.seq); }}, "fork")));
  const text = JSON.stringify(e.payload, null, 2);
  const detail = el("tr", {className: "payload", hidden: true},
    el("td", {colSpan: 6}, el("pre", {}, text.length > PAYLOAD_MAX ? text.slice(0, PAYLOAD_MAX) : text),
       text.length > PAYLOAD_MAX ? el("button", {onclick: (ev) => {
         ev.target.previousSibling.textContent = text; ev.target.remove(); }}, `show all (${text.length} chars)`) : null));
  row.addEventListener("click", () => { detail.hidden = !detail.hidden; });
  return [row, detail];
}

function renderWaiting(box, sid, state) {
  clear(box);
  for (const w of (state && state.waiting) || []) {
    box.appendChild(el("div", {className: "waiting", dataset: {call: w.call_id}},
      el("strong", {}, "waiting for approval: "), el("code", {}, `${w.name}(${JSON.stringify(w.arguments)})`),
      el("span", {className: "dim"}, " " + w.reason + " "),
      el("button", {className: "approve", dataset: {call: w.call_id},
                    onclick: () => decideCall(sid, w.call_id, true)}, "Approve"), " ",
      el("button", {className: "deny", dataset: {call: w.call_id},
                    onclick: () => decideCall(sid, w.call_id, false)}, "Deny")));
  }
}

async function decideCall(sid, callId, approved) {
  const reason = approved ? "" : (prompt("Why? (told to the model)") || "");
  try { await api("POST", `/api/sessions/${encodeURIComponent(sid)}/${approved ? "approve" : "deny"}`,
                  {call_id: callId, reason}); }
  catch (e) { showError(e); }
}

async function forkAt(sid, seq) {
  const message = prompt(`Fork after seq ${seq}. A message for the model (optional):`, "");
  if (message === null) return;
  const body = {at_seq: seq, run: true, reason: "forked in the inspector"};
  if (message) body.message = message;
  try {
    let made;
    try { made = await api("POST", `/api/sessions/${encodeURIComponent(sid)}/fork`, body); }
    catch (e) {
      if (e.status !== 409 || !e.data || !e.data.side_effects) throw e;
      if (!confirm(e.message + "\nFork anyway?")) return;
      made = await api("POST", `/api/sessions/${encodeURIComponent(sid)}/fork`,
                       {...body, acknowledge_side_effects: true});
    }
    go("#/s/" + made.session_id);
  } catch (e) { showError(e); }
}

async function showSession(sid) {
  current = sid;
  const view = clear(document.getElementById("view"));
  let s;
  try { s = await api("GET", "/api/sessions/" + encodeURIComponent(sid)); }
  catch (e) { view.appendChild(el("p", {className: "dim"}, e.message)); return; }
  if (current !== sid) return;
  const status = el("span", {id: "session-status"}, badge(s.status));
  const answer = el("div", {id: "answer"});
  const waiting = el("div", {id: "waiting"});
  const body = el("tbody", {id: "timeline"});
  const tree = el("div", {id: "tree", className: "tree"});
  const setState = (st, label) => {
    clear(status).appendChild(badge(label || st.status));
    clear(answer);
    if (st.answer) answer.appendChild(el("p", {}, el("strong", {}, "answer: "), el("span", {}, st.answer)));
    if (st.error) answer.appendChild(el("p", {}, el("strong", {}, "error: "), el("span", {}, st.error)));
    renderWaiting(waiting, sid, st);
    cancelBtn.hidden = !!st.terminal;
    resumeBtn.hidden = (label || st.status) !== "interrupted";
    feedback.hidden = !st.terminal;
  };
  const score = el("select", {id: "feedback-score"}, el("option", {value: ""}, "score…"),
                   ...["1", "0.5", "0"].map(v => el("option", {value: v}, v)));
  const comment = el("input", {id: "feedback-comment", placeholder: "a comment on this session", maxLength: 10000});
  const feedback = el("form", {id: "feedback", hidden: true, onsubmit: async (ev) => {
    ev.preventDefault();
    const body = {comment: comment.value};
    if (score.value !== "") body.score = Number(score.value);
    try { await api("POST", `/api/sessions/${encodeURIComponent(sid)}/feedback`, body); showSession(sid); }
    catch (e) { showError(e); } }}, "feedback: ", score, " ", comment, " ", el("button", {type: "submit"}, "Send"));
  const resumeBtn = el("button", {id: "resume", hidden: true, onclick: async () => {
    try { await api("POST", `/api/sessions/${encodeURIComponent(sid)}/resume`, {}); showSession(sid); }
    catch (e) { showError(e); } }}, "Resume");
  const cancelBtn = el("button", {id: "cancel", onclick: async () => {
    try { await api("POST", `/api/sessions/${encodeURIComponent(sid)}/cancel`, {}); } catch (e) { showError(e); } }},
    "Cancel");
  view.append(...[
    el("h2", {}, "session ", el("code", {}, sid), " ", status),
    el("p", {className: "goal", id: "session-goal"}, s.goal),
    s.parent ? el("p", {className: "dim"}, `${s.parent.kind} of `,
                  el("a", {href: "#/s/" + s.parent.session_id}, s.parent.session_id), ` at seq ${s.parent.seq} · `,
                  el("a", {href: `#/diff?a=${encodeURIComponent(s.parent.session_id)}&b=${encodeURIComponent(sid)}`},
                     "diff with parent")) : null,
    s.ok ? null : el("p", {className: "status status-failed"}, "fails verification: " + s.problem),
    s.driver_error ? el("p", {className: "status status-failed"}, "driver stopped: " + s.driver_error) : null,
    el("div", {}, cancelBtn, " ", resumeBtn), answer, feedback, waiting,
    el("h3", {}, "sessions of this tree"), tree,
    el("h3", {}, "timeline"),
    el("table", {}, el("thead", {}, el("tr", {}, ...["seq", "time", "type", "actor", "payload", ""].map(h => el("th", {}, h)))),
       body)].filter(Boolean));
  if (s.state) setState(s.state, s.status);
  for (const e of s.events) body.append(...eventRow(e, sid));
  showTree(sid, tree);
  follow(sid, s.events.length, body, setState, tree);
}

async function showTree(sid, box) {
  let t;
  try { t = await api("GET", `/api/sessions/${encodeURIComponent(sid)}/tree`); } catch (e) { return; }
  const node = (n) => el("li", {className: n.current ? "current" : "", dataset: {session: n.session_id}},
    el("span", {className: "node"}, badge(n.status), " ", el("a", {href: "#/s/" + n.session_id}, n.session_id.slice(0, 12)),
       n.kind !== "root" ? el("span", {className: "dim"}, ` ${n.kind} at seq ${n.seq}`) : null,
       " ", el("span", {className: "dim"}, short(n.goal, 80))),
    n.children.length ? el("ul", {}, ...n.children.map(node)) : null);
  clear(box).appendChild(el("ul", {}, node(t)));
}

// Server-sent events read with fetch (so the token goes in a header), parsed by blocks.
async function follow(sid, from, body, setState, tree) {
  if (streamAbort) streamAbort.abort();
  const abort = new AbortController();
  streamAbort = abort;
  let next = from, ended = false;
  const conn = document.getElementById("conn");
  while (!ended && !abort.signal.aborted) {
    try {
      const res = await fetch(`/api/sessions/${encodeURIComponent(sid)}/events?from=${next}`,
                              {headers: headers(false), signal: abort.signal});
      if (!res.ok) throw new Error((await res.json()).error);
      conn.textContent = "live";
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
          let kind = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (!data) continue;
          const msg = JSON.parse(data);
          if (kind === "event") { body.append(...eventRow(msg, sid)); next = msg.seq + 1; }
          else if (kind === "status") { setState(msg); refreshList(); showTree(sid, tree); }
          else if (kind === "end") { ended = true; }
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
      conn.textContent = "reconnecting…";
    }
    if (!ended) await new Promise(r => setTimeout(r, 1000));
  }
  conn.textContent = ended ? "" : conn.textContent;
}

// -- diff and eval reports ----------------------------------------------------------------
async function showDiff(params) {
  current = null;
  if (streamAbort) streamAbort.abort();
  const view = clear(document.getElementById("view"));
  const a = el("input", {id: "diff-a", value: params.get("a") || "", placeholder: "session A"});
  const b = el("input", {id: "diff-b", value: params.get("b") || "", placeholder: "session B"});
  const out = el("pre", {id: "diff-text"});
  view.append(el("h2", {}, "diff two sessions"),
    el("form", {onsubmit: (ev) => { ev.preventDefault(); go(`#/diff?a=${encodeURIComponent(a.value)}&b=${encodeURIComponent(b.value)}`); }},
       a, " ", b, " ", el("button", {type: "submit"}, "Diff")), out);
  if (!a.value || !b.value) return;
  try {
    const d = await api("GET", `/api/diff?a=${encodeURIComponent(a.value)}&b=${encodeURIComponent(b.value)}`);
    out.textContent = d.text;
  } catch (e) { out.textContent = e.message; }
}

async function showEvals() {
  current = null;
  if (streamAbort) streamAbort.abort();
  const view = clear(document.getElementById("view"));
  view.appendChild(el("h2", {}, "eval reports"));
  let d;
  try { d = await api("GET", "/api/evals"); } catch (e) { showError(e); return; }
  if (!d.suites.length) { view.appendChild(el("p", {className: "dim"}, "No eval results in this log (loopstream eval SUITE).")); return; }
  view.appendChild(el("table", {id: "evals"},
    el("tr", {}, ...["suite", "variant", "sessions", "verdicts passed", "pass rate", "failing sessions"].map(h => el("th", {}, h))),
    ...d.suites.map(s => el("tr", {}, el("td", {}, s.suite), el("td", {}, s.variant), el("td", {}, String(s.sessions)),
      el("td", {}, `${s.passed}/${s.verdicts}`), el("td", {}, s.pass_rate === null ? "-" : (100 * s.pass_rate).toFixed(0) + "%"),
      el("td", {}, ...s.failing.slice(0, 20).map(f => el("a", {href: "#/s/" + f}, f.slice(0, 8) + " ")))))));
}

// -- routing --------------------------------------------------------------------------------
function route() {
  const hash = location.hash.slice(1);
  if (hash.startsWith("/s/")) showSession(decodeURIComponent(hash.slice(3)));
  else if (hash.startsWith("/diff")) showDiff(new URLSearchParams(hash.split("?")[1] || ""));
  else if (hash.startsWith("/evals")) showEvals();
  refreshList();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("start-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const goal = document.getElementById("goal").value;
    try { const made = await api("POST", "/api/sessions", {goal}); document.getElementById("goal").value = ""; go("#/s/" + made.session_id); }
    catch (e) { showError(e); }
  });
  document.getElementById("search").addEventListener("input", refreshList);
  document.getElementById("status-filter").addEventListener("change", refreshList);
  window.addEventListener("hashchange", route);
  route();
  setInterval(refreshList, 3000);
});

// Blind A/B listening test: the server picks the trial and the clip order; this page only sees opaque URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { rater: "", token: null, played: new Set(), answered: 0 };
window.__listen = state;  // read by the browser test

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function setChoicesEnabled(on) {
  document.querySelectorAll(".choices button").forEach((b) => { b.disabled = !on; });
  $("hint").hidden = on;
}

async function next() {
  $("error").textContent = "";
  const t = await api(`/api/next?rater=${encodeURIComponent(state.rater)}`);
  if (t.finished) {
    $("trial").hidden = true;
    $("finished").hidden = false;
    state.token = null;
    return;
  }
  state.token = t.token;
  state.played = new Set();
  $("progress").textContent = `Trial ${t.done + 1} of ${t.total}`;
  $("question").textContent = t.prompt;
  $("ref").src = t.reference;
  $("clip1").src = t.clips[0];
  $("clip2").src = t.clips[1];
  setChoicesEnabled(false);
  $("trial").hidden = false;
}

for (const id of ["clip1", "clip2"]) {
  $(id).addEventListener("play", () => {
    state.played.add(id);
    if (state.played.size === 2) setChoicesEnabled(true);
  });
}

document.querySelectorAll(".choices button").forEach((button) => {
  button.addEventListener("click", async () => {
    const token = state.token;
    if (!token) return;
    state.token = null;  // one answer per trial, however fast the clicks
    setChoicesEnabled(false);
    document.querySelectorAll("audio").forEach((a) => a.pause());
    try {
      await api("/api/answer", { method: "POST", headers: { "Content-Type": "application/json" },
                                 body: JSON.stringify({ token, choice: button.dataset.choice }) });
    } catch (e) {
      $("error").textContent = `Could not save the answer: ${e.message}`;
      state.token = token;
      setChoicesEnabled(true);
      return;
    }
    state.answered += 1;
    try { await next(); } catch (e) { $("error").textContent = e.message; }
  });
});

$("rater").value = localStorage.getItem("openchroma-rater") || "";
$("begin").addEventListener("click", async () => {
  const rater = $("rater").value.trim();
  if (!rater) { $("error").textContent = "Please enter a name or an id first."; return; }
  localStorage.setItem("openchroma-rater", rater);
  state.rater = rater;
  $("start").hidden = true;
  try { await next(); } catch (e) { $("error").textContent = e.message; }
});

// OpenChroma browser client: the OpenAI Realtime protocol (GA events) to this server, over WebRTC by default
// (webrtc.js: the microphone and the answer on Opus tracks, events on the "oai-events" data channel) and over the
// WebSocket when WebRTC is not available (pcm16 in base64 events). No build step, no dependencies. On the WebSocket,
// audio in and out runs through AudioWorklets (audio-worklets.js); the capture worklet also drives the level meter.
import { openCall } from "./webrtc.js";

const RATE = 24000;                       // the wire format: pcm16 little-endian mono at 24 kHz, both ways
const MIN_COMMIT_SAMPLES = RATE / 10;     // the server refuses commits under 100 ms
const LS = { key: "openchroma.apiKey", voice: "openchroma.voice", mode: "openchroma.mode", instr: "openchroma.instructions" };
const VAD = { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 };
// ?transport=websocket skips WebRTC; ?transport=webrtc does not fall back to the WebSocket.
const TRANSPORT = new URLSearchParams(location.search).get("transport") || "auto";
const QUIET_ERRORS = new Set(["response_cancel_not_active"]); // harmless races: logged, not shown

const $ = (id) => document.getElementById(id);
const store = {
  get(k) { try { return localStorage.getItem(k); } catch { return null; } },
  set(k, v) { try { if (v == null || v === "") localStorage.removeItem(k); else localStorage.setItem(k, v); } catch { /* private mode */ } },
};

// State an automated test can read.
const oc = (window.__oc = { playedSamples: 0, turns: [], events: [], sent: [], truncates: [], connected: false, voice: null,
                           transport: null, fallback: null, rtc: null });

const S = {
  apiKey: store.get(LS.key) || "",
  mode: store.get(LS.mode) === "ptt" ? "ptt" : "vad",
  voice: store.get(LS.voice) || null,
  voices: [],
  voicesKnown: false,      // the library has been listed at least once (until then nothing is disabled for it)
  link: null,              // the connection: a WebSocket or a WebRTC call (isOpen, send, close; kind)
  connecting: null,        // promise while a connection opens
  configured: false,       // our session.update has been sent
  running: false,          // a conversation is on (mic streams / push-to-talk armed)
  ptt: "idle",             // idle | starting | holding | releasing
  pttHeld: false,          // the push-to-talk button (or space bar) is down right now
  pttSamples: 0,
  response: null,          // the response in progress: {id, itemId}
  muted: new Set(),        // response ids whose audio we stopped playing: later deltas are dropped
  lastAssistantItem: null,
  items: new Map(),        // item id -> {role, li, text, meta, transcript, heard (user audio transcript)}
  segments: new Map(),     // assistant item id -> {start, end} in 24 kHz samples pushed to the player
  pushed: 0,               // 24 kHz samples pushed to the player so far
  played: 0,               // 24 kHz samples the player has played so far
  lastItemPushed: null,
  recording: null,         // voice recording in progress: {chunks, samples}
  stats: { ttfts: [] },
};

// ----- UI helpers ----------------------------------------------------------------------------------------
function showError(message) {
  $("banner-text").textContent = message;
  $("banner").hidden = false;
}
$("banner-close").addEventListener("click", () => { $("banner").hidden = true; });

function setConn(state, text) {
  $("conn").dataset.state = state;
  $("conn-text").textContent = text;
  oc.connected = state === "on";
}

function fmtMs(x) { return Number.isFinite(x) ? `${Math.round(x)} ms` : "—"; }
function fmtRtf(x) { return Number.isFinite(x) ? x.toFixed(2) : "—"; }

function clearEmpty() { const e = $("log-empty"); if (e) e.remove(); }

function addBubble(id, role) {
  if (S.items.has(id)) return S.items.get(id);
  clearEmpty();
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  li.dataset.itemId = id;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const text = document.createElement("div");
  text.className = "text";
  const meta = document.createElement("div");
  meta.className = "meta";
  li.append(who, text, meta);
  $("log").append(li);
  const rec = { role, li, text, meta, transcript: "" };
  S.items.set(id, rec);
  scrollLog();
  return rec;
}

function scrollLog() {
  const log = $("log");
  const near = log.scrollHeight - log.scrollTop - log.clientHeight < 120;
  if (near) log.scrollTop = log.scrollHeight;
}

// ----- HTTP with the API key -----------------------------------------------------------------------------
function authHeaders() { return S.apiKey ? { Authorization: `Bearer ${S.apiKey}` } : {}; }

async function api(path, opts = {}) {
  const res = await fetch(path, { ...opts, headers: { ...authHeaders(), ...(opts.headers || {}) } });
  if (res.status === 401) {
    showKeyPanel(S.apiKey ? "The saved API key was refused." : null);
    throw new Error("the server needs an API key");
  }
  if (!res.ok) {
    let msg = `${res.status} ${res.statusText}`;
    try { const body = await res.json(); if (body && body.error && body.error.message) msg = body.error.message; } catch { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}

function showKeyPanel(note) {
  $("key-panel").hidden = false;
  $("api-key").value = S.apiKey;
  if (note) showError(note);
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  S.apiKey = $("api-key").value.trim();
  store.set(LS.key, S.apiKey);
  $("banner").hidden = true;
  loadVoices().then(() => { $("key-panel").hidden = true; }).catch(() => {});
});
$("key-forget").addEventListener("click", () => { S.apiKey = ""; store.set(LS.key, ""); $("api-key").value = ""; });

// ----- audio ---------------------------------------------------------------------------------------------
const audio = {
  ctx: null, player: null, playbackReady: null,
  capCtx: null, capture: null, stream: null, source: null, captureReady: null,
  level: 0, flushWaiters: new Map(), nextId: 1,
};

function ensurePlayback() {
  if (!audio.playbackReady) {
    audio.playbackReady = (async () => {
      let ctx;
      try { ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" }); } catch { ctx = new AudioContext({ latencyHint: "interactive" }); }
      audio.ctx = ctx;
      await ctx.audioWorklet.addModule(new URL("audio-worklets.js", import.meta.url));
      const node = new AudioWorkletNode(ctx, "oc-player", { numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { sourceRate: RATE } });
      node.port.onmessage = (e) => onPlayerMessage(e.data);
      node.connect(ctx.destination);
      audio.player = node;
    })();
    audio.playbackReady.catch(() => { audio.playbackReady = null; });
  }
  // resume() inside the user's gesture (Safari, Chrome's autoplay policy), before any await
  if (audio.ctx && audio.ctx.state !== "running") audio.ctx.resume().catch(() => {});
  return audio.playbackReady.then(() => (audio.ctx.state !== "running" ? audio.ctx.resume().catch(() => {}) : undefined));
}

function ensureCapture() {
  if (!audio.captureReady) {
    audio.captureReady = (async () => {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("this page cannot use the microphone here (it needs https:// or http://localhost)");
      }
      const ctx = new AudioContext({ latencyHint: "interactive" }); // the device's own rate; the worklet resamples
      try {
        const stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 } });
        await ctx.audioWorklet.addModule(new URL("audio-worklets.js", import.meta.url));
        const source = ctx.createMediaStreamSource(stream);
        const node = new AudioWorkletNode(ctx, "oc-capture", { numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { targetRate: RATE, batchMs: 50 } });
        node.port.onmessage = (e) => onCapture(e.data);
        source.connect(node);
        node.connect(ctx.destination); // outputs silence; keeps the node pulled in every browser
        Object.assign(audio, { capCtx: ctx, capture: node, stream, source });
        if (ctx.state !== "running") await ctx.resume().catch(() => {});
      } catch (e) {
        ctx.close().catch(() => {});
        throw e;
      }
    })();
    audio.captureReady.catch(() => { audio.captureReady = null; });
  }
  return audio.captureReady;
}

function stopCapture() {
  if (!audio.capture) return;
  audio.stream.getTracks().forEach((t) => t.stop());
  audio.source.disconnect();
  audio.capture.disconnect();
  audio.capCtx.close().catch(() => {});
  Object.assign(audio, { capCtx: null, capture: null, stream: null, source: null, level: 0, captureReady: null });
}

function onPlayerMessage(m) {
  if (m.type === "played" || m.type === "flushed") {
    S.played = m.played;
    oc.playedSamples = m.played;
    $("stat-played").textContent = `${Math.round((m.played * 1000) / RATE)} ms`;
    $("playing").textContent = m.queued > 0 ? "▶ playing" : "";
  }
  if (m.type === "flushed") {
    const w = audio.flushWaiters.get(m.id);
    if (w) { audio.flushWaiters.delete(m.id); w(m.played); }
  }
}

/** Stop playback at once; resolves to the number of 24 kHz samples played in all. */
function flushPlayback() {
  if (!audio.player) return Promise.resolve(S.played);
  const id = audio.nextId++;
  return new Promise((resolve) => {
    const done = (played) => { S.played = played; S.pushed = played; $("playing").textContent = ""; resolve(played); };
    audio.flushWaiters.set(id, done);
    audio.player.port.postMessage({ type: "flush", id });
    setTimeout(() => { if (audio.flushWaiters.delete(id)) done(S.played); }, 250); // a stalled context: use the last report
  });
}

function playChunk(itemId, b64) {
  const bin = atob(b64);
  const n = bin.length >> 1;
  const f = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    f[i] = v / 32768;
  }
  if (!audio.player) return;
  let seg = S.segments.get(itemId);
  if (!seg) { seg = { start: S.pushed, end: S.pushed }; S.segments.set(itemId, seg); }
  S.pushed += n;
  seg.end = S.pushed;
  S.lastItemPushed = itemId;
  audio.player.port.postMessage({ type: "push", samples: f }, [f.buffer]);
}

/** The assistant item whose audio is playing (or about to), with the ms of it played so far. */
function playingItem() {
  const id = (S.response && S.response.itemId) || S.lastItemPushed;
  if (!id) return null;
  const seg = S.segments.get(id);
  const active = !!(S.response && S.response.itemId === id);
  if (!active && (!seg || seg.end <= S.played)) return null; // finished playing: nothing to truncate
  return id;
}

/** An answer is being made or heard (over WebRTC: the server's track still carries one). */
function answerPlaying() {
  const onTrack = !!(S.link && S.link.kind === "webrtc" && S.rtcPlayed && S.rtcPlayed.since != null);
  return !!(S.response || playingItem() || onTrack);
}

/**
 * Barge-in / push-to-talk / typed interruption: stop the assistant now. With cancel, also cancel the response in
 * progress (server VAD cancels by itself). Tells the server how much of the item was actually heard.
 */
async function interrupt(cancel) {
  if (S.link && S.link.kind === "webrtc") { interruptCall(cancel); return; }
  const itemId = playingItem();
  if (S.response) {
    S.muted.add(S.response.id);
    if (cancel) send({ type: "response.cancel" });
  }
  const played = await flushPlayback();
  if (itemId && itemId === S.lastAssistantItem) {
    const seg = S.segments.get(itemId);
    const heard = seg ? Math.max(0, Math.min(played, seg.end) - seg.start) : 0;
    const ms = Math.round((heard * 1000) / RATE);
    send({ type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: ms });
    oc.truncates.push({ item_id: itemId, audio_end_ms: ms, played });
    const rec = S.items.get(itemId);
    if (rec) { rec.li.classList.add("interrupted"); rec.heardMs = ms; renderMeta(rec); }
  }
}

/** Over WebRTC the server plays the answer and knows what was heard: it truncates by itself. Server VAD also
 * stops the track by itself; a cancel (push-to-talk, typing, Stop playback) asks it to drop the queued audio. */
function interruptCall(cancel) {
  const itemId = S.response && S.response.itemId;
  if (S.response) S.muted.add(S.response.id);
  if (cancel) {
    if (S.response) send({ type: "response.cancel" });
    send({ type: "output_audio_buffer.clear" });
  }
  const rec = itemId ? S.items.get(itemId) : null;
  if (rec) rec.li.classList.add("interrupted");
}

$("stop-audio").addEventListener("click", () => {
  if (S.link && answerPlaying()) interrupt(true); else flushPlayback();
});

// ----- microphone ----------------------------------------------------------------------------------------
function bytesToB64(buf) {
  const u8 = new Uint8Array(buf);
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000));
  return btoa(s);
}

function onCapture(m) {
  audio.level = Math.max(m.peak || 0, (m.level || 0) * 2.5);
  if (m.flush && m.id != null) {
    const w = audio.flushWaiters.get(m.id);
    if (w) { audio.flushWaiters.delete(m.id); w(m); return; } // the caller uses this last batch itself
  }
  if (S.recording && m.samples) { S.recording.chunks.push(new Int16Array(m.pcm.slice(0))); S.recording.samples += m.samples; updateRecStatus(); }
  if (S.mode === "ptt" && S.ptt !== "idle" && m.samples) S.pttSamples += m.samples;
  // Over WebRTC the microphone goes out on the call's audio track, not in events.
  const open = S.link && S.link.kind === "websocket" && S.link.isOpen() && S.configured;
  if (!open || !m.samples) return;
  if (S.mode === "vad" && S.running) {
    send({ type: "input_audio_buffer.append", audio: bytesToB64(m.pcm) });
  } else if (S.mode === "ptt" && S.ptt !== "idle") {
    send({ type: "input_audio_buffer.append", audio: bytesToB64(m.pcm) });
  }
}

function flushCapture() {
  if (!audio.capture) return Promise.resolve(null);
  const id = audio.nextId++;
  return new Promise((resolve) => {
    audio.flushWaiters.set(id, resolve);
    audio.capture.port.postMessage({ type: "flush", id });
    setTimeout(() => { if (audio.flushWaiters.delete(id)) resolve(null); }, 250);
  });
}

let shownLevel = 0;
function drawMeter() {
  const target = audio.capture ? audio.level : 0;
  shownLevel = target > shownLevel ? target : shownLevel * 0.9 + target * 0.1;
  const db = 20 * Math.log10(Math.max(shownLevel, 1e-4)); // -80 .. 0 dB
  const pct = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
  $("meter-fill").style.width = `${pct.toFixed(1)}%`;
  $("meter").setAttribute("aria-valuenow", String(Math.round(pct)));
  audio.level *= 0.85;
  requestAnimationFrame(drawMeter);
}
requestAnimationFrame(drawMeter);

// ----- the realtime connection ---------------------------------------------------------------------------
function send(ev) {
  if (!S.link || !S.link.isOpen()) return false;
  S.link.send(JSON.stringify(ev));
  if (ev.type !== "input_audio_buffer.append") oc.sent.push(ev.type);
  return true;
}

function sessionConfig() {
  const s = {
    type: "realtime",
    audio: {
      input: {
        format: { type: "audio/pcm", rate: RATE },
        turn_detection: S.mode === "vad" ? { ...VAD } : null,
        transcription: { model: "chroma" },   // the server's Reasoner transcribes the user's turns
      },
      output: { format: { type: "audio/pcm", rate: RATE } },
    },
  };
  const instr = $("instructions").value.trim();
  if (instr) s.instructions = instr;
  if (S.voice) s.audio.output.voice = S.voice;
  return s;
}

function wsUrl() {
  const u = new URL("v1/realtime", location.href);
  u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  u.search = "?model=chroma";
  return u.toString();
}

/** Connect: over WebRTC unless ?transport=websocket, falling back to the WebSocket when WebRTC fails. */
function connect() {
  if (S.link && S.link.isOpen()) return Promise.resolve();
  if (S.connecting) return S.connecting;
  setConn("connecting", "Connecting…");
  S.connecting = (async () => {
    try {
      if (TRANSPORT !== "websocket") {
        try {
          await connectWebRTC();
          return;
        } catch (e) {
          if (e.status === 401) { showKeyPanel(S.apiKey ? "The saved API key was refused." : null); }
          if (TRANSPORT === "webrtc" || e.status === 401) {
            setConn("error", "Connection failed");
            if (e.status !== 401) showError(`WebRTC failed: ${e.message}`);
            throw new Error("connection failed");
          }
          oc.fallback = e.message;
          console.info("realtime: WebRTC unavailable, using the WebSocket:", e.message);
        }
      }
      await connectWebSocket();
    } finally {
      S.connecting = null;
    }
  })();
  return S.connecting;
}

function showTransport(kind) {
  oc.transport = kind;
  const el = $("transport");
  el.hidden = !kind;
  el.dataset.kind = kind || "";
  el.textContent = kind === "webrtc" ? "WebRTC" : kind === "websocket" ? "WebSocket" : "";
  el.title = kind === "websocket" && oc.fallback ? `WebRTC was not available (${oc.fallback}), so the WebSocket is used`
    : kind === "webrtc" ? "Audio on WebRTC tracks (Opus), events on the data channel" : "";
}

/** A WebRTC call: the microphone on the call's track (if it is open), events on the data channel. */
async function connectWebRTC() {
  const early = [];           // events that arrive before openCall returns (session.created)
  let link = null;
  let created;
  const sessionCreated = new Promise((resolve) => { created = resolve; });
  const onEvent = (ev) => {
    if (ev.type === "session.created") created();
    if (link) handleEvent(ev); else early.push(ev);
  };
  S.configured = false;
  link = await openCall({ url: "v1/realtime/calls", headers: authHeaders(), stream: audio.stream, player: $("remote-audio"),
                          onEvent, onClose: () => onLinkClosed(link) });
  S.link = link;
  showTransport("webrtc");
  early.splice(0).forEach(handleEvent);
  let timer;
  const late = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error("no session.created on the data channel")), 10000); });
  try { await Promise.race([sessionCreated, late]); } catch (e) { S.link = null; link.close(); throw e; } finally { clearTimeout(timer); }
  watchRtcAudio(link);
}

/** Over WebRTC the answer plays in an <audio> element. "Played" counts the time the server's track carried an
 * answer (output_audio_buffer.started to .stopped/.cleared); __oc.rtc has the track's receive statistics. */
function watchRtcAudio(link) {
  S.rtcPlayed = { seconds: 0, since: null };
  const tick = async () => {
    if (S.link !== link) return;
    const st = await link.stats().catch(() => null);
    if (st) oc.rtc = { packetsReceived: st.packetsReceived || 0, totalSamplesReceived: st.totalSamplesReceived || 0 };
    const p = S.rtcPlayed;
    const seconds = p.seconds + (p.since != null ? (performance.now() - p.since) / 1000 : 0);
    oc.playedSamples = Math.round(seconds * RATE);
    $("stat-played").textContent = `${Math.round(seconds * 1000)} ms`;
    setTimeout(tick, 200);
  };
  tick();
}

function onOutputBuffer(started) {
  const p = S.rtcPlayed;
  if (!p) return;
  if (started) { if (p.since == null) p.since = performance.now(); $("playing").textContent = "▶ playing"; return; }
  if (p.since != null) { p.seconds += (performance.now() - p.since) / 1000; p.since = null; }
  $("playing").textContent = "";
}

/** The call or the socket ended (not by disconnect()): reset the conversation. */
function onLinkClosed(link, text = "Disconnected") {
  if (S.link !== link) return;
  S.link = null;
  S.configured = false;
  S.response = null;
  endConversationUI();
  if (!S.recording) stopCapture();
  flushPlayback();
  setConn("idle", text);
}

function connectWebSocket() {
  const protocols = ["realtime"];
  if (S.apiKey) protocols.push(`openai-insecure-api-key.${S.apiKey}`);
  return new Promise((resolve, reject) => {
    let ws;
    try { ws = new WebSocket(wsUrl(), protocols); } catch (e) { setConn("error", "Cannot connect"); reject(e); return; }
    const link = { kind: "websocket", isOpen: () => ws.readyState === WebSocket.OPEN, send: (t) => ws.send(t),
                   close: () => ws.close(1000, "bye") };
    S.link = link;
    S.configured = false;
    let created = false;
    ws.onmessage = (e) => {
      let ev;
      try { ev = JSON.parse(e.data); } catch { return; }
      if (ev.type === "session.created" && !created) { created = true; showTransport("websocket"); resolve(); }
      handleEvent(ev);
    };
    ws.onclose = (e) => {
      if (created) {
        onLinkClosed(link, e.code === 1000 ? "Disconnected" : `Disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`);
        return;
      }
      onLinkClosed(link);
      setConn("error", "Connection failed");
      // A browser cannot see why a WebSocket was refused: ask over HTTP whether a key is missing.
      fetch("v1/models", { headers: authHeaders() }).then((r) => {
        if (r.status === 401) showKeyPanel(S.apiKey ? "The saved API key was refused." : null);
        else if (!$("banner").hidden) { /* the server already said why */ } else showError(`Could not open the realtime connection (${e.code}${e.reason ? ": " + e.reason : ""}).`);
      }).catch(() => showError("The server cannot be reached."));
      reject(new Error("connection failed"));
    };
  });
}

function disconnect() {
  if (S.link) { const link = S.link; S.link = null; link.close(); }
  S.configured = false;
  S.response = null;
  showTransport(null);
  setConn("idle", "Disconnected");
}

function handleEvent(ev) {
  const t = ev.type;
  if (oc.events.length < 50000) oc.events.push(t);
  switch (t) {
    case "session.created":
      setConn("on", "Connected");
      send({ type: "session.update", session: sessionConfig() });
      S.configured = true;
      break;
    case "session.updated": {
      const s = ev.session || {};
      const v = s.audio && s.audio.output && s.audio.output.voice;
      oc.voice = v || null;
      const td = s.audio && s.audio.input ? s.audio.input.turn_detection : undefined;
      setConn("on", `Connected · ${td ? "hands-free" : "push-to-talk"}${v ? " · " + v : ""}`);
      break;
    }
    case "input_audio_buffer.speech_started":
      $("speaking").hidden = false;
      if (answerPlaying()) interrupt(false); // the server cancels the response (and clears the track) itself
      break;
    case "input_audio_buffer.speech_stopped":
      $("speaking").hidden = true;
      break;
    case "input_audio_buffer.committed":
      break;
    case "conversation.item.added":
      onItemAdded(ev.item || {});
      break;
    case "conversation.item.created": // the same item again, for beta clients
      break;
    case "conversation.item.input_audio_transcription.delta":
    case "conversation.item.input_audio_transcription.completed":
      onUserTranscript(ev, t.endsWith(".completed"));
      break;
    case "conversation.item.input_audio_transcription.failed":
      console.debug("realtime: no transcript for", ev.item_id, ev.error && ev.error.message);
      break;
    case "response.created":
      S.response = { id: ev.response && ev.response.id, itemId: null };
      break;
    case "response.output_item.added": {
      const item = ev.item || {};
      if (S.response && ev.response_id === S.response.id) S.response.itemId = item.id;
      S.lastAssistantItem = item.id;
      const rec = addBubble(item.id, "assistant");
      rec.li.classList.add("streaming");
      rec.responseId = ev.response_id;
      break;
    }
    case "response.content_part.added":
      break;
    case "response.output_audio.delta":
      if (S.muted.has(ev.response_id)) break;
      playChunk(ev.item_id, ev.delta);
      break;
    case "response.output_audio_transcript.delta": {
      const rec = S.items.get(ev.item_id) || addBubble(ev.item_id, "assistant");
      if (S.muted.has(ev.response_id)) break;
      rec.transcript += ev.delta;
      rec.text.textContent = rec.transcript;
      scrollLog();
      break;
    }
    case "response.output_audio.done":
      if (audio.player) audio.player.port.postMessage({ type: "end" });
      break;
    case "response.output_audio_transcript.done": {
      const rec = S.items.get(ev.item_id) || addBubble(ev.item_id, "assistant");
      rec.transcript = ev.transcript || "";
      rec.final = rec.transcript;
      rec.text.textContent = rec.transcript;
      break;
    }
    case "response.done":
      onResponseDone(ev.response || {});
      break;
    case "conversation.item.truncated":
      break;
    case "output_audio_buffer.started":   // WebRTC: the answer's audio is on the track ...
      onOutputBuffer(true);
      break;
    case "output_audio_buffer.stopped":   // ... and has all been played
      onOutputBuffer(false);
      break;
    case "output_audio_buffer.cleared": {   // ... or was dropped (barge-in, cancel): not all of it was heard
      onOutputBuffer(false);
      const rec = [...S.items.values()].find((r) => r.responseId && r.responseId === ev.response_id);
      if (rec) rec.li.classList.add("interrupted");
      break;
    }
    case "error": {
      const err = ev.error || {};
      if (QUIET_ERRORS.has(err.code)) { console.debug("realtime:", err.message); break; }
      showError(err.message || "error");
      break;
    }
    default:
      break;
  }
}

function onItemAdded(item) {
  if (item.role === "user") {
    const rec = addBubble(item.id, "user");
    const parts = item.content || [];
    const texts = parts.filter((p) => p.type === "input_text" || p.type === "text").map((p) => p.text);
    const hasAudio = parts.some((p) => p.type === "input_audio");
    rec.text.textContent = texts.length ? texts.join("\n") : hasAudio ? "🎤 speech" : "";
    if (hasAudio && !texts.length) rec.li.classList.add("voice");
  } else if (item.role === "assistant") {
    S.lastAssistantItem = item.id;
    addBubble(item.id, "assistant");
  }
}

/** What the server heard in a user's audio: shown in that turn's bubble, as it arrives and when complete. */
function onUserTranscript(ev, completed) {
  const rec = S.items.get(ev.item_id);
  if (!rec || rec.role !== "user") return;
  rec.heard = completed ? (ev.transcript || "").trim() : (rec.heard || "") + (ev.delta || "");
  if (completed) rec.heardFinal = true;
  if (!rec.heard.trim()) return;   // nothing recognised: keep the "speech" placeholder
  rec.text.textContent = completed ? rec.heard : rec.heard.trimStart();
  rec.text.classList.add("transcribed");
  rec.li.classList.toggle("transcribing", !completed);
  scrollLog();
}

function renderMeta(rec) {
  const bits = [];
  const t = rec.turn;
  if (t) {
    if (t.ttft_ms != null) bits.push(`TTFT ${fmtMs(t.ttft_ms)}`);
    if (t.rtf != null) bits.push(`RTF ${fmtRtf(t.rtf)}`);
    if (t.audio_seconds != null) bits.push(`${t.audio_seconds.toFixed(1)} s audio`);
    if (t.status === "incomplete") bits.push("hit the length limit");
    else if (t.status && t.status !== "completed" && t.status !== "cancelled") bits.push(t.status);
  }
  if (rec.heardMs != null) bits.push(`interrupted at ${(rec.heardMs / 1000).toFixed(1)} s`);
  else if (t && t.status === "cancelled") bits.push("interrupted");
  rec.meta.textContent = bits.join(" · ");
}

function onResponseDone(r) {
  const meta = r.server_timings || {};   // the server's figures (metadata is the client's own)
  const out = (r.output || [])[0] || {};
  const itemId = out.id || (S.response && S.response.itemId);
  const rec = itemId ? S.items.get(itemId) : null;
  const turn = {
    response_id: r.id, item_id: itemId || null, status: r.status,
    ttft_ms: meta.ttft_ms != null ? Number(meta.ttft_ms) : null,
    rtf: meta.rtf != null ? Number(meta.rtf) : null,
    audio_seconds: meta.audio_seconds != null ? Number(meta.audio_seconds) : null,
    transcript: rec ? (rec.final != null ? rec.final : rec.transcript) : "",
  };
  oc.turns.push(turn);
  if (S.response && S.response.id === r.id) S.response = null;
  if (audio.player) audio.player.port.postMessage({ type: "end" });
  if (rec) {
    rec.li.classList.remove("streaming");
    rec.li.dataset.status = r.status || "";
    rec.turn = turn;
    renderMeta(rec);
    if (r.status === "failed") {
      const d = r.status_details && r.status_details.error;
      showError(`The response failed${d && d.message ? ": " + d.message : ""}.`);
    }
  }
  if (Number.isFinite(turn.ttft_ms)) S.stats.ttfts.push(turn.ttft_ms);
  $("stat-ttft").textContent = fmtMs(turn.ttft_ms ?? NaN);
  $("stat-rtf").textContent = fmtRtf(turn.rtf ?? NaN);
  const avg = S.stats.ttfts.length ? S.stats.ttfts.reduce((a, b) => a + b, 0) / S.stats.ttfts.length : NaN;
  $("stat-ttft-avg").textContent = fmtMs(avg);
  $("stat-turns").textContent = String(oc.turns.length);
  $("stat-rate").textContent = Number.isFinite(turn.rtf) && turn.rtf > 0 ? `${(1 / turn.rtf).toFixed(1)}×` : "—";
}

// ----- conversation controls -----------------------------------------------------------------------------
/** Start, Send and push-to-talk need a voice to answer in: with an empty library, say how to add one. */
function updateStartUI() {
  const none = S.voicesKnown && !S.voices.length;
  $("voice-needed").hidden = !none;
  $("start").disabled = none && !S.running;
  $("text-send").disabled = none;
  if (none && !S.shownAddVoice) { S.shownAddVoice = true; $("voice-add").open = true; }   // once: it may be closed again
  updateModeUI();
}

async function startConversation() {
  const btn = $("start");
  btn.disabled = true;
  try {
    await ensurePlayback();
    try {
      await ensureCapture();
    } catch (e) {
      showError(`Microphone unavailable (${e.message || e.name}); you can still type messages.`);
    }
    await connect();
    if (S.link && S.link.setMic && audio.stream) await S.link.setMic(audio.stream);   // a call placed without it
    S.running = true;
    btn.textContent = "Stop";
    btn.setAttribute("aria-pressed", "true");
    btn.classList.add("on");
    updateModeUI();
  } catch (e) {
    if (e && e.message && e.message !== "connection failed") showError(e.message);
  } finally {
    btn.disabled = false;
    updateStartUI();
  }
}

function endConversationUI() {
  S.running = false;
  S.ptt = "idle";
  const btn = $("start");
  btn.textContent = "Start";
  btn.setAttribute("aria-pressed", "false");
  btn.classList.remove("on");
  $("speaking").hidden = true;
  updateModeUI();
}

function stopConversation() {
  flushPlayback();
  disconnect();
  stopCapture();
  endConversationUI();
}

$("start").addEventListener("click", () => { if (S.running) stopConversation(); else startConversation(); });

function updateModeUI() {
  document.querySelectorAll('input[name="mode"]').forEach((r) => { r.checked = r.value === S.mode; });
  const ptt = $("ptt");
  ptt.hidden = S.mode !== "ptt";
  // Usable as soon as push-to-talk is chosen: a press before Start starts the conversation itself.
  ptt.disabled = S.mode !== "ptt" || (S.voicesKnown && !S.voices.length && !S.running);
  $("mode-hint").textContent = S.mode === "vad"
    ? "Hands-free: just talk; speaking over the answer interrupts it (headphones help if it interrupts itself)."
    : "Push-to-talk: hold the button (or the space bar) while you speak, release to send.";
}

document.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", () => {
  if (!r.checked) return;
  S.mode = r.value === "ptt" ? "ptt" : "vad";
  store.set(LS.mode, S.mode);
  updateModeUI();
  if (S.link && S.configured) {
    send({ type: "session.update", session: { type: "realtime", audio: { input: { turn_detection: S.mode === "vad" ? { ...VAD } : null } } } });
    if (S.mode === "ptt") send({ type: "input_audio_buffer.clear" });
  }
}));

async function pttDown() {
  if (S.mode !== "ptt" || S.ptt !== "idle" || $("ptt").disabled) return;
  S.pttHeld = true;
  if (!S.running) {   // pressed before Start: connect and open the microphone, then listen while it is held
    S.ptt = "starting";
    $("ptt").textContent = "Connecting…";
    await startConversation();
    S.ptt = "idle";
    $("ptt").textContent = "Hold to talk";
    if (!S.running || !S.pttHeld) return;
  }
  S.ptt = "holding";
  S.pttSamples = 0;
  $("ptt").classList.add("held");
  $("ptt").setAttribute("aria-pressed", "true");
  $("ptt").textContent = "Listening… release to send";
  $("speaking").hidden = false;
  send({ type: "input_audio_buffer.clear" }); // before any append of this press
  if (answerPlaying()) await interrupt(true);
}

async function pttUp() {
  S.pttHeld = false;
  if (S.ptt !== "holding") return;
  S.ptt = "releasing";
  $("ptt").classList.remove("held");
  $("ptt").setAttribute("aria-pressed", "false");
  $("ptt").textContent = "Hold to talk";
  $("speaking").hidden = true;
  const last = await flushCapture();
  if (last && last.samples && S.link && S.configured) {
    S.pttSamples += last.samples;
    if (S.link.kind === "websocket") send({ type: "input_audio_buffer.append", audio: bytesToB64(last.pcm) });
  }
  // Over WebRTC the last 20 ms frames are still on their way on the track.
  if (S.link && S.link.kind === "webrtc") await new Promise((resolve) => setTimeout(resolve, 200));
  S.ptt = "idle";
  if (S.pttSamples < MIN_COMMIT_SAMPLES) {
    send({ type: "input_audio_buffer.clear" });
    showError("Too short: hold the button while you speak.");
    return;
  }
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
}

const pttBtn = $("ptt");
pttBtn.addEventListener("pointerdown", (e) => {
  if (e.button !== 0) return;
  e.preventDefault();
  try { pttBtn.setPointerCapture(e.pointerId); } catch { /* not capturable */ }
  pttDown();
});
pttBtn.addEventListener("pointerup", () => pttUp());
pttBtn.addEventListener("pointercancel", () => pttUp());
pttBtn.addEventListener("contextmenu", (e) => e.preventDefault());
pttBtn.addEventListener("keydown", (e) => { if ((e.key === "Enter") && !e.repeat) { e.preventDefault(); pttDown(); } });
pttBtn.addEventListener("keyup", (e) => { if (e.key === "Enter") { e.preventDefault(); pttUp(); } });

const TEXT_INPUTS = new Set(["text", "password", "search", "email", "url", "number", "tel", ""]);
function typing(el) {
  if (!el) return false;
  if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") return true;
  return el.tagName === "INPUT" && TEXT_INPUTS.has((el.getAttribute("type") || "").toLowerCase());
}
window.addEventListener("keydown", (e) => {
  if (e.code !== "Space" || typing(e.target) || S.mode !== "ptt") return;
  e.preventDefault();
  if (!e.repeat) pttDown();
});
window.addEventListener("keyup", (e) => {
  if (e.code !== "Space" || typing(e.target) || S.mode !== "ptt") return;
  e.preventDefault();
  pttUp();
});
window.addEventListener("blur", () => pttUp());

$("text-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("text-input");
  const text = input.value.trim();
  if (!text) return;
  try {
    await ensurePlayback();
    await connect();
  } catch (err) {
    if (err && err.message !== "connection failed") showError(err.message);
    return;
  }
  input.value = "";
  if (answerPlaying()) await interrupt(true);
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  send({ type: "response.create" });
});

$("clear-log").addEventListener("click", () => {
  $("log").replaceChildren();
  for (const [id, rec] of S.items) { if (!rec.li.isConnected) S.items.delete(id); }
});

// ----- instructions --------------------------------------------------------------------------------------
$("instructions").value = store.get(LS.instr) || "";
$("instr-apply").addEventListener("click", () => {
  const v = $("instructions").value.trim();
  store.set(LS.instr, v);
  if (S.link && S.configured && v) {
    send({ type: "session.update", session: { type: "realtime", instructions: v } });
    $("instr-msg").textContent = "Applied to this conversation.";
  } else {
    $("instr-msg").textContent = v ? "Saved; used when you connect." : "Empty: the server's default is used on the next connection.";
  }
  setTimeout(() => { $("instr-msg").textContent = ""; }, 4000);
});

// ----- voices --------------------------------------------------------------------------------------------
let refAudio = null;

async function loadVoices() {
  const res = await api("v1/voices");
  const body = await res.json();
  S.voices = Array.isArray(body.data) ? body.data : [];
  S.voicesKnown = true;
  if (!S.voices.some((v) => v.name === S.voice)) S.voice = S.voices.length ? S.voices[0].name : null;
  store.set(LS.voice, S.voice);
  renderVoices();
  updateStartUI();
  if (S.voice && S.link && S.configured && oc.voice !== S.voice) selectVoice(S.voice);
}

function renderVoices() {
  const ul = $("voice-list");
  ul.replaceChildren();
  if (!S.voices.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "No voices yet: add one below (1–30 s of clear speech and exactly what it says).";
    ul.append(li);
    return;
  }
  for (const v of S.voices) {
    const li = document.createElement("li");
    li.className = "voice" + (v.name === S.voice ? " selected" : "");
    li.dataset.voice = v.name;
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "voice-pick";
    pick.setAttribute("aria-pressed", String(v.name === S.voice));
    const name = document.createElement("span");
    name.className = "voice-name";
    name.textContent = v.name;
    const info = document.createElement("span");
    info.className = "voice-info";
    const dur = Number(v.duration_seconds);
    info.textContent = `${Number.isFinite(dur) ? dur.toFixed(1) + " s · " : ""}${v.transcript || ""}`;
    info.title = v.transcript || "";
    pick.append(name, info);
    pick.addEventListener("click", () => selectVoice(v.name));
    const play = document.createElement("button");
    play.type = "button";
    play.className = "btn ghost small";
    play.textContent = "Play";
    play.setAttribute("aria-label", `Play the reference of ${v.name}`);
    play.addEventListener("click", () => playReference(v.name, play));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "btn ghost small danger";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete voice ${v.name}`);
    del.addEventListener("click", () => deleteVoice(v.name));
    li.append(pick, play, del);
    ul.append(li);
  }
}

function selectVoice(name) {
  S.voice = name;
  store.set(LS.voice, name);
  renderVoices();
  if (S.link && S.configured) send({ type: "session.update", session: { type: "realtime", audio: { output: { voice: name } } } });
}

async function playReference(name, btn) {
  try {
    if (refAudio) { refAudio.pause(); URL.revokeObjectURL(refAudio.src); refAudio = null; }
    const res = await api(`v1/voices/${encodeURIComponent(name)}/audio`);
    const url = URL.createObjectURL(await res.blob());
    refAudio = new Audio(url);
    btn.textContent = "Playing…";
    refAudio.onended = refAudio.onpause = () => { btn.textContent = "Play"; };
    await refAudio.play();
  } catch (e) {
    btn.textContent = "Play";
    showError(`Cannot play ${name}: ${e.message}`);
  }
}

async function deleteVoice(name) {
  if (!window.confirm(`Delete the voice “${name}” from the server's library?`)) return;
  try {
    await api(`v1/voices/${encodeURIComponent(name)}`, { method: "DELETE" });
    if (S.voice === name) S.voice = null;
    await loadVoices();
  } catch (e) {
    showError(`Cannot delete ${name}: ${e.message}`);
  }
}

$("voices-refresh").addEventListener("click", () => loadVoices().catch((e) => showError(`Cannot list voices: ${e.message}`)));

// Recording a voice from the microphone: the capture worklet's 24 kHz pcm16 -> a WAV blob.
let recordedBlob = null;

function wavBlob(chunks, samples, rate) {
  const buf = new ArrayBuffer(44 + samples * 2);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + samples * 2, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  str(36, "data"); v.setUint32(40, samples * 2, true);
  const out = new Int16Array(buf, 44, samples);
  let o = 0;
  for (const c of chunks) { out.set(c.subarray(0, Math.min(c.length, samples - o)), o); o += c.length; if (o >= samples) break; }
  return new Blob([buf], { type: "audio/wav" });
}

function updateRecStatus() {
  const r = S.recording;
  if (r) $("voice-rec-status").textContent = `● recording ${(r.samples / RATE).toFixed(1)} s`;
}

$("voice-record").addEventListener("click", async () => {
  const btn = $("voice-record");
  if (S.recording) {
    const last = await flushCapture();
    const r = S.recording;
    S.recording = null;
    if (last && last.samples) { r.chunks.push(new Int16Array(last.pcm.slice(0))); r.samples += last.samples; }
    if (!S.running) stopCapture();
    btn.textContent = "Record from mic";
    btn.setAttribute("aria-pressed", "false");
    recordedBlob = wavBlob(r.chunks, r.samples, RATE);
    const prev = $("voice-preview");
    if (prev.src) URL.revokeObjectURL(prev.src);
    prev.src = URL.createObjectURL(recordedBlob);
    prev.hidden = false;
    $("voice-rec-status").textContent = `Recorded ${(r.samples / RATE).toFixed(1)} s (used instead of a file).`;
    $("voice-file").value = "";
    return;
  }
  try {
    await ensureCapture();
  } catch (e) {
    showError(`Microphone unavailable: ${e.message || e.name}`);
    return;
  }
  S.recording = { chunks: [], samples: 0 };
  recordedBlob = null;
  btn.textContent = "Stop recording";
  btn.setAttribute("aria-pressed", "true");
  updateRecStatus();
});

$("voice-file").addEventListener("change", () => {
  if ($("voice-file").files.length) {
    recordedBlob = null;
    $("voice-preview").hidden = true;
    $("voice-rec-status").textContent = "";
  }
});

$("voice-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const msg = $("voice-form-msg");
  msg.className = "form-msg";
  const name = $("voice-name").value.trim();
  const transcript = $("voice-transcript").value.trim();
  const file = $("voice-file").files[0];
  if (S.recording) { msg.textContent = "Stop the recording first."; msg.classList.add("bad"); return; }
  if (!file && !recordedBlob) { msg.textContent = "Choose an audio file or record one."; msg.classList.add("bad"); return; }
  const fd = new FormData();
  fd.append("name", name);
  fd.append("transcript", transcript);
  if (file) fd.append("file", file, file.name);
  else fd.append("file", recordedBlob, `${name || "voice"}.wav`);
  const submit = $("voice-submit");
  submit.disabled = true;
  msg.textContent = "Uploading and encoding the voice…";
  try {
    await api("v1/voices", { method: "POST", body: fd });
    msg.textContent = `Added “${name}”.`;
    msg.classList.add("good");
    $("voice-form").reset();
    recordedBlob = null;
    $("voice-preview").hidden = true;
    $("voice-rec-status").textContent = "";
    S.voice = name;
    await loadVoices();
    selectVoice(name);
  } catch (err) {
    msg.textContent = err.message;
    msg.classList.add("bad");
  } finally {
    submit.disabled = false;
  }
});

// ----- the model -----------------------------------------------------------------------------------------
/** Which model the server runs, and a warning badge when its weights are random (it speaks noise). */
async function loadModelInfo() {
  let body = null;
  try { body = await (await fetch("health")).json(); } catch { /* unreachable: the connection code says so */ }
  const status = body && body.status;
  if (status === "ok") {
    $("model-name").textContent = body.model || "?";
    $("random-badge").hidden = !body.random_weights;
    oc.model = { id: body.model, random_weights: !!body.random_weights };
    return;
  }
  $("model-name").textContent = status === "loading" ? "loading…" : status === "error" ? "failed to load" :
    body ? "?" : "server unreachable";
  if (status === "error" && body.error) {   // the reason, plainly: e.g. which model could not be loaded and why
    $("model-name").title = body.error;
    showError(`The model is not available: ${body.error}`);
  }
  if (status === "loading" || !body) setTimeout(loadModelInfo, 2000);
}

// ----- start ---------------------------------------------------------------------------------------------
loadModelInfo();
updateModeUI();
if (S.apiKey) $("api-key").value = S.apiKey;
loadVoices().catch((e) => { if (!/API key/.test(e.message)) showError(`Cannot list voices: ${e.message}`); });

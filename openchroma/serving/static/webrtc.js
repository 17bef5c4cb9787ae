// The WebRTC transport of the browser client, as OpenAI defines it: POST /v1/realtime/calls with an SDP offer
// (201 + the SDP answer + Location), the "oai-events" data channel for the realtime events, Opus audio both ways.
// openCall() rejects with WebRTCUnavailable when this browser or the server has no WebRTC, or ICE does not connect
// in time, so the caller can fall back to the WebSocket.

export class WebRTCUnavailable extends Error {
  constructor(message, status = 0) { super(message); this.name = "WebRTCUnavailable"; this.status = status; }
}

/** Resolves once ICE gathering is complete (the server does no trickle ICE), or after ``ms`` with what there is. */
function iceGathered(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ms);
  });
}

/** Resolves once the peer connection is connected and the data channel open; rejects after ``ms`` or on failure. */
function connected(pc, channel, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new WebRTCUnavailable(`ICE did not connect within ${ms / 1000} s`)), ms);
    const check = () => {
      if (pc.connectionState === "failed" || pc.connectionState === "closed") {
        clearTimeout(timer);
        reject(new WebRTCUnavailable(`the peer connection ${pc.connectionState}`));
      } else if (channel.readyState === "open" && pc.connectionState === "connected") {
        clearTimeout(timer);
        resolve();
      }
    };
    pc.addEventListener("connectionstatechange", check);
    channel.addEventListener("open", check);
    check();
  });
}

/**
 * Place a call. ``stream``: the microphone (its first audio track goes out; none: receive only, setMic later).
 * ``player``: the <audio> element that plays the answer. ``onEvent`` gets each server event (parsed JSON),
 * ``onClose`` once when the call ends. Returns the link: {kind, callUrl, isOpen(), send(text), setMic(stream),
 * close(), stats()}.
 */
export async function openCall({ url, headers = {}, stream = null, player, onEvent, onClose, connectTimeoutMs = 6000 }) {
  if (typeof RTCPeerConnection === "undefined") throw new WebRTCUnavailable("this browser has no WebRTC");
  const pc = new RTCPeerConnection();
  const channel = pc.createDataChannel("oai-events");
  const track = stream ? stream.getAudioTracks()[0] : null;
  // sendrecv even without a microphone, so one can be added later without renegotiating (replaceTrack).
  const transceiver = pc.addTransceiver(track || "audio", { direction: "sendrecv", streams: stream ? [stream] : [] });
  pc.addEventListener("track", (e) => {
    player.srcObject = e.streams[0] || new MediaStream([e.track]);
    player.play().catch(() => { /* autoplay refused: plays on the next gesture */ });
  });
  channel.addEventListener("message", (e) => {
    let ev;
    try { ev = JSON.parse(e.data); } catch { return; }
    if (ev && typeof ev.type === "string") onEvent(ev);
  });
  let callUrl = null;
  let ended = false;
  const end = () => { if (!ended) { ended = true; onClose(); } };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, 3000);
    const res = await fetch(url, { method: "POST", body: pc.localDescription.sdp,
                                   headers: { ...headers, "Content-Type": "application/sdp" } });
    if (res.status !== 201) throw new WebRTCUnavailable(`the offer was answered ${res.status}`, res.status);
    callUrl = new URL(res.headers.get("Location") || "", new URL(url, location.href)).toString();
    await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
    await connected(pc, channel, connectTimeoutMs);
  } catch (e) {
    pc.close();
    if (callUrl) fetch(`${callUrl}/hangup`, { method: "POST", headers }).catch(() => {});
    throw e instanceof WebRTCUnavailable ? e : new WebRTCUnavailable(e.message || String(e));
  }
  channel.addEventListener("close", end);
  pc.addEventListener("connectionstatechange", () => {
    if (pc.connectionState === "failed" || pc.connectionState === "closed") end();
  });
  return {
    kind: "webrtc",
    callUrl,
    isOpen: () => !ended && channel.readyState === "open",
    send: (text) => channel.send(text),
    setMic: (s) => transceiver.sender.replaceTrack(s ? s.getAudioTracks()[0] || null : null),
    close() {
      if (ended) return;
      fetch(`${callUrl}/hangup`, { method: "POST", headers }).catch(() => {});
      pc.close();
      end();
    },
    /** The remote audio track's receive statistics (inbound-rtp): packets, decoded samples, audio energy. */
    async stats() {
      const report = await pc.getStats();
      for (const s of report.values()) {
        if (s.type === "inbound-rtp" && s.kind === "audio") return s;
      }
      return null;
    },
  };
}

"""Prometheus metrics for the server: one registry per app, so several apps can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 4.0)


def response_status(stop_reason: str) -> str:
    """The OpenAI response status for an engine stop reason (eos, length, cancelled, error)."""
    return {"eos": "completed", "length": "incomplete", "cancelled": "cancelled"}.get(stop_reason, "failed")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge("openchroma_sessions_active", "Conversations holding an engine slot", ["route"],
                                     registry=r)
        self.sessions_total = Counter("openchroma_sessions_total", "Conversations started", ["route"], registry=r)
        self.sessions_rejected = Counter("openchroma_sessions_rejected_total",
                                         "Requests refused because every session slot was in use", registry=r)
        self.responses = Counter("openchroma_responses_total", "Responses finished, by how they ended",
                                 ["route", "status"], registry=r)
        self.ttft = Histogram("openchroma_ttft_seconds", "Time from the request to the first audio frame",
                              ["route"], buckets=TTFT_BUCKETS, registry=r)
        self.rtf = Histogram("openchroma_rtf", "Real-time factor of a response (seconds spent per second of audio)",
                             ["route"], buckets=RTF_BUCKETS, registry=r)
        self.frames = Counter("openchroma_frames_generated_total", "80 ms audio frames generated", registry=r)
        self.audio_seconds = Counter("openchroma_audio_seconds_total", "Seconds of speech generated", registry=r)
        self.errors = Counter("openchroma_errors_total", "Errors answered to clients, by type", ["type"], registry=r)
        self.voices = Gauge("openchroma_voices", "Voices in the library", registry=r)

    def observe_response(self, route: str, done) -> None:
        """Record a finished engine response (an ``engine.ResponseDone``)."""
        self.responses.labels(route, response_status(done.stop_reason)).inc()
        t = done.timings or {}
        ttft = t.get("ttft_ms")
        if ttft is not None and ttft == ttft:
            self.ttft.labels(route).observe(ttft / 1000)
        rtf = t.get("rtf")
        if rtf is not None and rtf == rtf and done.stop_reason in ("eos", "length"):
            self.rtf.labels(route).observe(rtf)
        self.frames.inc(done.frames)
        self.audio_seconds.inc(t.get("audio_seconds", 0.0) or 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

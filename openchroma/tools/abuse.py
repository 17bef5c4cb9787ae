"""Abusive clients for ``openchroma loadtest --abuse``: what one user can do to everyone else.

Three kinds run beside the well-behaved clients, each in a loop until the run ends:

* **item flood**: a realtime session (no VAD) adds many ``conversation.item.create`` text items in one burst,
  then asks for a response, waits for it, and starts over on a new connection;
* **big appends**: ``input_audio_buffer.append`` events of 15 MiB (over the event limit: read and refused) and
  of a legal turn just under it (about 118 s of 24 kHz PCM16), the buffer cleared after each;
* **long chat audio**: ``/v1/chat/completions`` with an ``input_audio`` part of hours of silent FLAC (a few
  hundred kB, over the per-part limit) and one of legal length (``long_chat_seconds`` of WAV noise).

``compare`` puts the well-behaved clients' figures from a clean run and from the run with abusers side by side.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from openchroma.audio import float_to_pcm16

RATE = 24000


@dataclass
class AbuseConfig:
    item_floods: int = 1              # concurrent flooding clients
    items: int = 1000                 # conversation items per flood
    item_chars: int = 100             # characters per item
    appenders: int = 1
    append_mib: float = 15.0          # the oversized append (the server refuses events over its limit)
    legal_append_seconds: float = 118.0
    chat_clients: int = 1
    long_chat_hours: float = 2.0      # the over-limit chat part (silent FLAC: about 180 kB per hour)
    long_chat_seconds: float = 110.0  # the legal chat part (noise, 16 kHz WAV)
    pause: float = 0.5                # between two abuses of one client


@dataclass
class AbuseStats:
    sent: dict[str, int] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)    # error codes, HTTP statuses, exceptions
    slowest_ms: dict[str, float] = field(default_factory=dict)

    def count(self, table: str, key: str) -> None:
        d = getattr(self, table)
        d[key] = d.get(key, 0) + 1

    def took(self, kind: str, seconds: float) -> None:
        self.slowest_ms[kind] = max(self.slowest_ms.get(kind, 0.0), 1000 * seconds)


def silent_flac(seconds: float, rate: int = 16000) -> bytes:
    """A FLAC of silence: hours of it compress to a few hundred kB (written a minute at a time)."""
    import soundfile as sf

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        minute = np.zeros(rate * 60, np.float32)
        for left in range(int(seconds * rate), 0, -minute.size):
            f.write(minute[: min(left, minute.size)])
    return buf.getvalue()


def _pcm16_wav(x: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def _until(deadline: float, pause: float, body, stats: AbuseStats, kind: str) -> None:
    """Run ``body()`` again and again until ``deadline``; failures are counted, never raised."""
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            await body()
        except Exception as e:  # an abuser's failure is data, not a reason to stop the run
            stats.count("answers", f"{kind}: {type(e).__name__}")
        stats.took(kind, time.monotonic() - t0)
        await asyncio.sleep(pause)


async def _drain(ws, until: set[str], stats: AbuseStats, kind: str, timeout: float = 120.0) -> dict[str, Any]:
    """Read events until one of ``until`` and return it (errors counted by code)."""
    end = time.monotonic() + timeout
    while True:
        ev = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(0.1, end - time.monotonic())))
        if ev["type"] == "error":
            stats.count("answers", f"{kind}: {ev['error'].get('code') or 'error'}")
        if ev["type"] in until:
            return ev


async def _open(ws, stats: AbuseStats, kind: str) -> bool:
    """Wait for the session (False: refused, e.g. every slot taken) and turn VAD off."""
    if (await _drain(ws, {"session.created", "error"}, stats, kind, 30))["type"] == "error":
        return False
    await ws.send(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "max_output_tokens": 4, "audio": {"input": {"turn_detection": None}}}}))
    return True


async def item_flood(url: str, headers: dict, cfg: AbuseConfig, deadline: float, stats: AbuseStats) -> None:
    import websockets

    text = ("flood " * (cfg.item_chars // 6 + 1))[: cfg.item_chars]
    item = json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})

    async def flood() -> None:
        async with websockets.connect(url, additional_headers=headers, max_size=None, open_timeout=30,
                                      close_timeout=2) as ws:
            if not await _open(ws, stats, "items"):
                return
            for _ in range(cfg.items):
                await ws.send(item)
            stats.sent["items"] = stats.sent.get("items", 0) + cfg.items
            await ws.send(json.dumps({"type": "response.create"}))
            await _drain(ws, {"response.done"}, stats, "items")
            stats.count("answers", "items: response.done")

    await _until(deadline, cfg.pause, flood, stats, "items")


async def big_appends(url: str, headers: dict, cfg: AbuseConfig, deadline: float, stats: AbuseStats) -> None:
    import websockets

    legal = base64.b64encode(float_to_pcm16(np.zeros(int(cfg.legal_append_seconds * RATE), np.float32))).decode()
    huge = "A" * int(cfg.append_mib * 2**20)   # valid base64; the event's size is what gets it refused

    async def appends() -> None:
        async with websockets.connect(url, additional_headers=headers, max_size=None, open_timeout=30,
                                      close_timeout=2, max_queue=None) as ws:
            if not await _open(ws, stats, "appends"):
                return
            while time.monotonic() < deadline:
                for kind, audio in (("append 15 MiB", huge), ("append legal", legal)):
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                    stats.sent[kind] = stats.sent.get(kind, 0) + 1
                    await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                    await _drain(ws, {"input_audio_buffer.cleared"}, stats, "appends")
                    await asyncio.sleep(cfg.pause)

    await _until(deadline, cfg.pause, appends, stats, "appends")


async def long_chat_audio(server: str, headers: dict, cfg: AbuseConfig, deadline: float, stats: AbuseStats) -> None:
    import httpx

    over = base64.b64encode(silent_flac(cfg.long_chat_hours * 3600)).decode()
    noise = 0.1 * np.random.default_rng(0).standard_normal(int(cfg.long_chat_seconds * 16000)).astype(np.float32)
    legal = base64.b64encode(_pcm16_wav(noise, 16000)).decode()
    url = server.rstrip("/") + "/v1/chat/completions"

    async def post(client: httpx.AsyncClient, kind: str, data: str, fmt: str) -> None:
        body = {"model": "loadtest", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}]}
        t0 = time.monotonic()
        r = await client.post(url, json=body, headers=headers, timeout=300)
        stats.took(kind, time.monotonic() - t0)
        stats.sent[kind] = stats.sent.get(kind, 0) + 1
        stats.count("answers", f"{kind}: {r.status_code}")

    async def chats() -> None:
        async with httpx.AsyncClient() as client:
            await post(client, f"chat {cfg.long_chat_hours:g} h flac", over, "flac")
            await post(client, f"chat {cfg.long_chat_seconds:g} s wav", legal, "wav")

    await _until(deadline, cfg.pause, chats, stats, "chat")


def tasks(server: str, ws_url: str, api_key: str | None, cfg: AbuseConfig, deadline: float,
          stats: AbuseStats) -> list[asyncio.Task]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    make = ([item_flood(ws_url, headers, cfg, deadline, stats) for _ in range(cfg.item_floods)]
            + [big_appends(ws_url, headers, cfg, deadline, stats) for _ in range(cfg.appenders)]
            + [long_chat_audio(server, headers, cfg, deadline, stats) for _ in range(cfg.chat_clients)])
    return [asyncio.create_task(c) for c in make]


def _row(name: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"run": name, "gap_max_ms": s["gap_ms"]["max"], "gap_p99_ms": s["gap_ms"]["p99"],
            "underruns": s["underruns"], "stall_seconds": s["stall_seconds"], "ttft_p50_ms": s["ttft_ms"]["p50"],
            "ttft_max_ms": s["ttft_ms"]["max"], "turns": s["turns"], "audio_seconds": s["audio_seconds"],
            "errors": s["errors"]}


def compare(clean: dict[str, Any], abused: dict[str, Any], stats: AbuseStats, cfg: AbuseConfig) -> dict[str, Any]:
    """The well-behaved clients' figures without and with the abusers, and what the abusers did."""
    return {"config": asdict(cfg), "clean": _row("clean", clean), "abusive": _row("with abusers", abused),
            "abusers": asdict(stats)}


def markdown(report: dict[str, Any]) -> str:
    def f(x: float | None, digits: int = 0) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    lines = ["", "Well-behaved clients, without and with abusive clients:", "",
             "| run | largest gap (ms) | p99 gap (ms) | underruns | stalled (s) | TTFT p50 (ms) | TTFT max (ms) "
             "| turns | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for r in (report["clean"], report["abusive"]):
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
        lines.append(f"| {r['run']} | {f(r['gap_max_ms'])} | {f(r['gap_p99_ms'])} | {r['underruns']} | "
                     f"{f(r['stall_seconds'], 2)} | {f(r['ttft_p50_ms'])} | {f(r['ttft_max_ms'])} | {r['turns']} | "
                     f"{errors} |")
    a = report["abusers"]
    lines += ["", "- abusers sent: " + (", ".join(f"{k} {v}" for k, v in a["sent"].items()) or "nothing"),
              "- answers: " + (", ".join(f"{k} {v}" for k, v in sorted(a["answers"].items())) or "none"),
              "- slowest round (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in a["slowest_ms"].items())]
    return "\n".join(lines) + "\n"

"""``openchroma loadtest``: many realtime clients against a running server, measured from the outside.

Each of N clients opens ``/v1/realtime`` (the ``websockets`` library), picks a voice and turns server VAD off,
then loops until the run ends: it streams a turn of synthetic, speech-like user audio paced in real time
(100 ms appends), commits it and sends ``response.create``, and listens. Every client keeps a playback clock:
audio deltas fill a jitter buffer that drains in real time, and a delta that arrives after the buffer ran dry
is an underrun (the listener would hear a gap). Sometimes a client barges in (``response.cancel`` after part of
the answer) and sometimes it drops the connection mid-answer and reconnects.

Reported, as JSON, markdown and PNG: TTFT from the end of the user's speech (the commit) to the first audio,
gaps between consecutive audio deltas, underruns and stall time, cancel latency, responses by status, errors
by code, refused sessions and disconnects. With ``abuse`` set, the clients first run alone, then again beside
abusive clients (``abuse.py``: item floods, oversized appends, long chat audio), and both runs' figures are
reported side by side.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openchroma.audio import float_to_pcm16
from openchroma.constants import FRAME_SECONDS
from openchroma.reporting import distribution, fmt, markdown_table, pyplot, save_figure

from . import abuse as abusers
from .abuse import AbuseConfig, AbuseStats

RATE = 24000
APPEND_SECONDS = 0.1


@dataclass
class LoadConfig:
    server: str                       # http://host:port (ws:// also accepted)
    clients: int = 4
    duration: float = 60.0            # seconds of load; clients finish their current turn after it
    out: Path = Path("loadtest-results")
    api_key: str | None = None
    voice: str | None = None          # a library voice; None: the server's default
    voice_audio: Path | None = None   # register this reference first (as --voice, default name "loadtest")
    voice_text: str | None = None
    turn_seconds: tuple[float, float] = (1.0, 3.0)   # user speech per turn, drawn uniformly
    pause_seconds: tuple[float, float] = (0.3, 1.5)  # between the end of an answer and the next turn
    response_tokens: int = 25         # max_output_tokens per response (2 frames each: 25 = 4 s of audio)
    barge_in: float = 0.2             # chance a turn is interrupted by the client
    disconnect: float = 0.05          # chance a turn ends with the client dropping the connection
    jitter_ms: float = 100.0          # playback starts this long after the first audio delta
    seed: int = 0
    abuse: AbuseConfig | None = None  # also run abusive clients, after a clean run of the same length (abuse.py)


@dataclass
class ClientStats:
    turns: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    underruns: int = 0
    stall_seconds: float = 0.0
    audio_seconds: float = 0.0
    cancel_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    connects: int = 0
    disconnects: int = 0
    barge_ins: int = 0
    connect_failures: int = 0


def speech_like(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Noise shaped like speech for a VAD and a codec: syllable-rate amplitude bursts over low-passed noise."""
    n = int(seconds * RATE)
    noise = rng.standard_normal(n).astype(np.float32)
    kernel = np.ones(8, np.float32) / 8
    voiced = np.convolve(noise, kernel, mode="same")
    t = np.arange(n) / RATE
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6.28)), 0, None) ** 0.5
    return (0.3 * voiced * envelope).astype(np.float32)


def _pcm16_b64(x: np.ndarray) -> str:
    return base64.b64encode(float_to_pcm16(x)).decode()


def _ws_url(server: str) -> str:
    base = server.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    return base + "/v1/realtime"


class Playback:
    """A listener's playback clock: deltas fill a buffer that drains in real time once playback starts."""

    def __init__(self, jitter: float):
        self.jitter = jitter
        self.buffer_end: float | None = None   # when the audio received so far finishes playing
        self.last_arrival: float | None = None
        self.underruns = 0
        self.stall = 0.0
        self.gaps: list[float] = []

    def add(self, now: float, seconds: float) -> None:
        if self.buffer_end is None:
            self.buffer_end = now + self.jitter
        elif now > self.buffer_end:      # the buffer ran dry before this chunk came: an audible gap
            self.underruns += 1
            self.stall += now - self.buffer_end
            self.buffer_end = now
        if self.last_arrival is not None:
            self.gaps.append(1000 * (now - self.last_arrival))
        self.last_arrival = now
        self.buffer_end += seconds


async def _recv(ws, timeout: float) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=timeout))


async def _client(index: int, cfg: LoadConfig, deadline: float, stats: ClientStats) -> None:
    import websockets

    rng = np.random.default_rng(cfg.seed * 1000 + index)
    chance = random.Random(cfg.seed * 1000 + index)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    while time.monotonic() < deadline:
        try:
            async with websockets.connect(_ws_url(cfg.server), additional_headers=headers, max_size=None,
                                          open_timeout=30, close_timeout=2) as ws:
                stats.connects += 1
                first = await _recv(ws, 30)
                if first["type"] == "error":
                    stats.refused += 1
                    code = first["error"].get("code") or "error"
                    stats.errors[code] = stats.errors.get(code, 0) + 1
                    await asyncio.sleep(1.0)
                    continue
                session: dict[str, Any] = {"type": "realtime", "max_output_tokens": cfg.response_tokens,
                                           "audio": {"input": {"turn_detection": None}}}
                if cfg.voice:
                    session["audio"]["output"] = {"voice": cfg.voice}
                await ws.send(json.dumps({"type": "session.update", "session": session}))
                while (ev := await _recv(ws, 30))["type"] != "session.updated":
                    if ev["type"] == "error":
                        raise RuntimeError(f"session.update refused: {ev['error'].get('message')}")
                while time.monotonic() < deadline:
                    dropped = await _turn(ws, cfg, rng, chance, stats)
                    if dropped:
                        break
                    await asyncio.sleep(chance.uniform(*cfg.pause_seconds))
        except (OSError, asyncio.TimeoutError, RuntimeError) as e:
            stats.connect_failures += 1
            key = type(e).__name__
            stats.errors[key] = stats.errors.get(key, 0) + 1
            await asyncio.sleep(0.5)
        except websockets.exceptions.WebSocketException as e:
            stats.connect_failures += 1
            key = type(e).__name__
            stats.errors[key] = stats.errors.get(key, 0) + 1
            await asyncio.sleep(0.5)


async def _turn(ws, cfg: LoadConfig, rng: np.random.Generator, chance: random.Random, stats: ClientStats) -> bool:
    """One user turn and its answer; True when the client dropped the connection."""
    audio = speech_like(rng.uniform(*cfg.turn_seconds), rng)
    step = int(APPEND_SECONDS * RATE)
    t0 = time.monotonic()
    for k, i in enumerate(range(0, len(audio), step)):   # paced in real time, as a microphone delivers it
        await asyncio.sleep(max(0.0, t0 + k * APPEND_SECONDS - time.monotonic()))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _pcm16_b64(audio[i:i + step])}))
    await asyncio.sleep(max(0.0, t0 + len(audio) / RATE - time.monotonic()))
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    end_of_speech = time.monotonic()
    await ws.send(json.dumps({"type": "response.create"}))
    stats.turns += 1
    barge = chance.random() < cfg.barge_in
    drop = not barge and chance.random() < cfg.disconnect
    interrupt_after = chance.uniform(0.2, 1.5)   # seconds of answer heard before barging in / dropping
    playback = Playback(cfg.jitter_ms / 1000)
    first_audio: float | None = None
    cancel_sent: float | None = None
    while True:
        ev = await _recv(ws, 120)
        now = time.monotonic()
        kind = ev["type"]
        if kind == "response.output_audio.delta":
            seconds = len(base64.b64decode(ev["delta"])) / 2 / RATE
            if first_audio is None:
                first_audio = now
                stats.ttft_ms.append(1000 * (now - end_of_speech))
            if cancel_sent is None:
                playback.add(now, seconds)
                stats.audio_seconds += seconds
            if first_audio is not None and now - first_audio >= interrupt_after and cancel_sent is None:
                if drop:
                    stats.disconnects += 1
                    _merge_playback(stats, playback)
                    await ws.close()
                    return True
                if barge:
                    stats.barge_ins += 1
                    cancel_sent = now
                    await ws.send(json.dumps({"type": "response.cancel"}))
        elif kind == "error":
            code = ev["error"].get("code") or "error"
            stats.errors[code] = stats.errors.get(code, 0) + 1
            if code in ("response_cancel_not_active",):
                continue
            if first_audio is None and code not in ("input_audio_buffer_commit_empty",):
                continue
        elif kind == "response.done":
            status = ev["response"]["status"]
            stats.statuses[status] = stats.statuses.get(status, 0) + 1
            if cancel_sent is not None:
                stats.cancel_ms.append(1000 * (now - cancel_sent))
            _merge_playback(stats, playback)
            return False


def _merge_playback(stats: ClientStats, playback: Playback) -> None:
    stats.underruns += playback.underruns
    stats.stall_seconds += playback.stall
    stats.gaps_ms.extend(playback.gaps)


def _register_voice(cfg: LoadConfig) -> None:
    import httpx

    name = cfg.voice or "loadtest"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    with open(cfg.voice_audio, "rb") as f:
        r = httpx.post(cfg.server.rstrip("/") + "/v1/voices", files={"file": (Path(cfg.voice_audio).name, f)},
                       data={"name": name, "transcript": cfg.voice_text or ""}, headers=headers, timeout=120)
    if r.status_code not in (201, 409):
        raise RuntimeError(f"registering the voice failed: {r.status_code} {r.text[:300]}")
    cfg.voice = name


def summarize(cfg: LoadConfig, per_client: list[ClientStats], wall: float) -> dict[str, Any]:
    ttft = [x for s in per_client for x in s.ttft_ms]
    gaps = [x for s in per_client for x in s.gaps_ms]
    cancels = [x for s in per_client for x in s.cancel_ms]
    audio = sum(s.audio_seconds for s in per_client)
    underruns = sum(s.underruns for s in per_client)

    def count(attr: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in per_client:
            for k, v in getattr(s, attr).items():
                out[k] = out.get(k, 0) + v
        return dict(sorted(out.items()))

    def dist(xs: list[float]) -> dict[str, float | None]:
        return {"n": len(xs), **distribution(xs, (50, 90, 99), stats=("max",), empty=None)}

    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "api_key"},
        "wall_seconds": wall,
        "turns": sum(s.turns for s in per_client),
        "ttft_ms": dist(ttft),
        "gap_ms": dist(gaps),
        "cancel_ms": dist(cancels),
        "audio_seconds": audio,
        "underruns": underruns,
        "underruns_per_audio_minute": underruns / (audio / 60) if audio else None,
        "stall_seconds": sum(s.stall_seconds for s in per_client),
        "responses": count("statuses"),
        "errors": count("errors"),
        "refused_sessions": sum(s.refused for s in per_client),
        "connects": sum(s.connects for s in per_client),
        "disconnects": sum(s.disconnects for s in per_client),
        "barge_ins": sum(s.barge_ins for s in per_client),
        "connect_failures": sum(s.connect_failures for s in per_client),
        "per_client": [asdict(s) | {"ttft_ms": None, "gaps_ms": None} for s in per_client],
        "raw": {"ttft_ms": ttft, "gap_ms": gaps, "cancel_ms": cancels},
    }


def _fmt(x: float | None, digits: int = 0) -> str:
    return fmt(x, digits, missing="–")


def markdown(summary: dict[str, Any]) -> str:
    c = summary["config"]
    t, g, k = summary["ttft_ms"], summary["gap_ms"], summary["cancel_ms"]
    lines = [
        f"Load test: {c['clients']} realtime clients for {c['duration']:g} s against {c['server']} "
        f"(turns of {c['turn_seconds'][0]:g}–{c['turn_seconds'][1]:g} s paced in real time, "
        f"{c['response_tokens']} tokens per answer, barge-in {c['barge_in']:.0%}, disconnect {c['disconnect']:.0%}, "
        f"{c['jitter_ms']:g} ms jitter buffer)",
        "",
        markdown_table(["metric", "n", "p50", "p90", "p99", "max"], [
            [name, d["n"], *(_fmt(d[q]) for q in ("p50", "p90", "p99", "max"))]
            for name, d in (("TTFT, end of speech → first audio (ms)", t), ("gap between audio deltas (ms)", g),
                            ("cancel → response.done (ms)", k))]).rstrip("\n"),
        "",
        f"- turns: {summary['turns']}; audio received: {summary['audio_seconds']:.1f} s; responses: "
        + (", ".join(f"{k} {v}" for k, v in summary["responses"].items()) or "none"),
        f"- playback underruns: {summary['underruns']} ({_fmt(summary['underruns_per_audio_minute'], 2)} per minute "
        f"of audio), stalled {summary['stall_seconds']:.2f} s in all",
        f"- refused sessions: {summary['refused_sessions']}; connects: {summary['connects']}; client disconnects: "
        f"{summary['disconnects']}; barge-ins: {summary['barge_ins']}; connection failures: "
        f"{summary['connect_failures']}",
        "- errors: " + (", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"),
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ttft = sorted(summary["raw"]["ttft_ms"])
    if ttft:
        axes[0].plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft))
    axes[0].set(title="TTFT (end of speech → first audio)", xlabel="ms", ylabel="fraction of turns")
    gaps = summary["raw"]["gap_ms"]
    if gaps:
        axes[1].hist(gaps, bins=60, log=True)
        axes[1].axvline(FRAME_SECONDS * 1000, color="k", linestyle=":", label="80 ms (one frame)")
        axes[1].legend()
    axes[1].set(title="gaps between audio deltas", xlabel="ms", ylabel="count")
    per = summary["per_client"]
    axes[2].bar(range(len(per)), [p["underruns"] for p in per])
    axes[2].set(title="playback underruns per client", xlabel="client", ylabel="underruns")
    save_figure(fig, path, dpi=100)


async def _run(cfg: LoadConfig, abuse: AbuseStats | None = None) -> tuple[list[ClientStats], float]:
    """The well-behaved clients' stats (and the wall time); with ``abuse`` (and ``cfg.abuse``) abusive clients
    run beside them, counted there."""
    stats = [ClientStats() for _ in range(cfg.clients)]
    start = time.monotonic()
    deadline = start + cfg.duration
    tasks = [asyncio.create_task(_client(i, cfg, deadline, stats[i])) for i in range(cfg.clients)]
    if abuse is not None and cfg.abuse is not None:
        tasks += abusers.tasks(cfg.server, _ws_url(cfg.server), cfg.api_key, cfg.abuse, deadline, abuse)
    # Clients finish the turn in progress; one that cannot within a grace period is stopped.
    done, pending = await asyncio.wait(tasks, timeout=cfg.duration + 120)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()
    return stats, time.monotonic() - start


def loadtest(cfg: LoadConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the load test; write ``loadtest.json``, ``loadtest.md`` and ``loadtest.png`` under ``cfg.out``."""
    if cfg.voice_audio is not None:
        _register_voice(cfg)
    clean = None
    if cfg.abuse is not None:   # the same clients alone first: the figures the abusers are measured against
        clean = summarize(cfg, *asyncio.run(_run(cfg)))
    stats = AbuseStats()
    per_client, wall = asyncio.run(_run(cfg, stats))
    summary = summarize(cfg, per_client, wall)
    text = markdown(summary)
    if clean is not None:
        summary["abuse"] = abusers.compare(clean, summary, stats, cfg.abuse)
        text += abusers.markdown(summary["abuse"])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "loadtest.json", "md": out / "loadtest.md", "png": out / "loadtest.png"}
    paths["json"].write_text(json.dumps(summary, indent=1))
    paths["md"].write_text(text)
    plot(summary, paths["png"])
    return summary, paths

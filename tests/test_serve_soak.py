"""The load-test tool against the test server, and the bounded soak test built on its clients.

The soak runs about a minute by default; ``OPENCHROMA_SOAK_SECONDS`` sets its length (e.g. 1800 for a long one).
Every third cycle adds abusive clients (item floods, oversized appends, long chat audio parts), bounded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time

import httpx
import pytest
from hardening_helpers import add_voice, connect, probe, recv, rss_bytes, wait_until
from server_harness import chroma_server

from openchroma.tools.abuse import AbuseConfig, AbuseStats
from openchroma.tools.loadtest import LoadConfig, _run, loadtest

pytestmark = pytest.mark.slow   # a minute of soak and a load test

SOAK_SECONDS = float(os.environ.get("OPENCHROMA_SOAK_SECONDS", "60"))


def test_loadtest_reports_ttft_gaps_underruns_and_errors(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path / "data", max_sessions=2, max_response_seconds=3) as (url, state):
        add_voice(url)
        cfg = LoadConfig(server=url, clients=3, duration=6, out=tmp_path / "out", voice="lib",
                         turn_seconds=(0.4, 0.8), pause_seconds=(0.1, 0.2), response_tokens=8, barge_in=0.3,
                         disconnect=0.2, seed=1)
        summary, paths = loadtest(cfg)
        for p in paths.values():
            assert p.is_file() and p.stat().st_size > 0
        data = json.loads(paths["json"].read_text())
        assert data["turns"] >= 2 and data["ttft_ms"]["n"] >= 1 and data["gap_ms"]["n"] >= 1
        assert data["refused_sessions"] >= 1, "3 clients on 2 slots: one must have been refused"
        assert data["errors"].get("session_limit_reached", 0) >= 1
        assert "internal_error" not in data["errors"]
        assert "TTFT" in paths["md"].read_text()
        assert wait_until(lambda: not state.engine.sessions and not state.connections, 10)


def test_loadtest_abuse_reports_the_clients_with_and_without_abusers(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path / "data", max_sessions=6, max_response_seconds=2) as (url, state):
        add_voice(url)
        abuse = AbuseConfig(items=50, legal_append_seconds=5.0, long_chat_hours=1.0, long_chat_seconds=5.0)
        cfg = LoadConfig(server=url, clients=2, duration=4, out=tmp_path / "out", voice="lib", turn_seconds=(0.4, 0.8),
                         pause_seconds=(0.1, 0.2), response_tokens=6, barge_in=0, disconnect=0, abuse=abuse)
        summary, paths = loadtest(cfg)
        report = json.loads(paths["json"].read_text())["abuse"]
        for run in ("clean", "abusive"):
            assert report[run]["turns"] >= 1 and report[run]["gap_max_ms"] is not None, report[run]
        sent, answers = report["abusers"]["sent"], report["abusers"]["answers"]
        assert sent["items"] >= 50 and sent["append 15 MiB"] >= 1 and sent["chat 1 h flac"] >= 1, sent
        assert answers["appends: message_too_large"] == sent["append 15 MiB"], answers
        assert answers["chat 1 h flac: 400"] == sent["chat 1 h flac"], answers
        md = paths["md"].read_text()
        assert "Well-behaved clients, without and with abusive clients" in md and "| with abusers |" in md
        assert wait_until(lambda: not state.engine.sessions and not state.connections, 10)


# Every third cycle abusive clients join (bounded): a conversation-item flood, 15 MiB and legal 30 s appends, and
# chat requests with a 2-hour FLAC part (over the limit) and a legal 30 s one.
SOAK_ABUSE = AbuseConfig(items=150, item_chars=100, legal_append_seconds=30.0, long_chat_hours=2.0,
                         long_chat_seconds=30.0, pause=0.3)


def test_soak_clients_talk_barge_in_and_disconnect_at_random(tiny_chroma, tmp_path):
    cycle_seconds = 6.0
    cycles = max(3, int(SOAK_SECONDS / (cycle_seconds + 2)))
    with chroma_server(tiny_chroma, tmp_path / "data", max_sessions=6, max_response_seconds=2,
                       idle_timeout=30) as (url, state):
        add_voice(url)
        rss: list[int] = []
        totals = {"turns": 0, "responses": 0, "errors": {}}
        abuse = AbuseStats()
        for cycle in range(cycles):
            abusive = cycle % 3 == 1
            cfg = LoadConfig(server=url, clients=3 if abusive else 4, duration=cycle_seconds, voice="lib",
                             turn_seconds=(0.3, 0.8), pause_seconds=(0.05, 0.3), response_tokens=6, barge_in=0.35,
                             disconnect=0.35, seed=cycle, abuse=SOAK_ABUSE if abusive else None)
            per_client, _ = asyncio.run(_run(cfg, abuse))
            totals["turns"] += sum(s.turns for s in per_client)
            totals["responses"] += sum(sum(s.statuses.values()) for s in per_client)
            for s in per_client:
                for k, v in s.errors.items():
                    totals["errors"][k] = totals["errors"].get(k, 0) + v
            assert wait_until(lambda: not state.engine.sessions and not state.connections, 10), \
                f"cycle {cycle}: sessions left active: {len(state.engine.sessions)}"
            gc.collect()
            if not abusive:   # compare like with like: abusive cycles' large requests leave more heap in use
                rss.append(rss_bytes())
        # Afterwards: nothing active, memory per cycle bounded, and a new session still answers.
        assert not state.client_sessions
        warm = rss[len(rss) // 2:]
        per_cycle = (warm[-1] - warm[0]) / max(1, len(warm) - 1)
        print(f"\nsoak: {cycles} cycles x {cycle_seconds:g} s, {totals['turns']} turns, {totals['responses']} "
              f"responses, errors {totals['errors']}; RSS {rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB, "
              f"{per_cycle / 1024:+.0f} KiB per cycle over the second half")
        print(f"soak abusers: sent {abuse.sent}; answers {abuse.answers}")
        assert totals["turns"] >= cycles * 2
        assert "internal_error" not in totals["errors"]
        assert abuse.sent.get("items", 0) >= SOAK_ABUSE.items and abuse.sent.get("chat 2 h flac", 0) >= 1
        assert abuse.answers.get("chat 2 h flac: 400", 0) == abuse.sent["chat 2 h flac"]
        assert not [k for k in abuse.answers if "internal_error" in k or ": 5" in k], abuse.answers
        assert per_cycle < 8 * 2**20, f"memory grows {per_cycle / 2**20:.1f} MiB per cycle"
        with connect(url) as ws:
            recv(ws, "session.created")
            ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 3,
                                                                      "audio": {"input": {"turn_detection": None}}}}))
            recv(ws, "session.updated")
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Still there?"}]}}))
            ws.send(json.dumps({"type": "response.create"}))
            t0 = time.monotonic()
            assert recv(ws, "response.done", limit=60)["response"]["status"] in ("completed", "incomplete")
            assert time.monotonic() - t0 < 60
            probe(ws, "after-soak")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"

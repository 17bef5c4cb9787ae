"""The voice library shared by two servers (two replicas): in PostgreSQL (--voices-db) against a real server that
the tests start, and in the embedded SQLite store when both share one --data-dir (replicas on one machine):
add, use, replace, delete, concurrent adds of one name, a lost connection and recovery, a legacy index."""

from __future__ import annotations

import threading

import httpx
import pytest
from pg_harness import missing_reason, postgres_server
from server_harness import SPEECH_WAV, chroma_server
from test_serve_voices import TRANSCRIPT, error, upload


@pytest.fixture(scope="module")
def pg():
    if missing_reason() is not None:
        pytest.skip(missing_reason())
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["postgres", "sqlite"])
def replicas(request, tiny_chroma, tmp_path):
    """Two servers (fresh engines) sharing one voice store: a PostgreSQL database (emptied first; separate data
    dirs), or one data dir's SQLite store."""
    if request.param == "sqlite":
        with chroma_server(tiny_chroma, tmp_path) as a, chroma_server(tiny_chroma, tmp_path) as b:
            yield a, b
        return
    import psycopg

    pg = request.getfixturevalue("pg")
    with psycopg.connect(pg.url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS openchroma_voices, openchroma_schema")
    with chroma_server(tiny_chroma, tmp_path / "a", voices_db=pg.url) as a, \
            chroma_server(tiny_chroma, tmp_path / "b", voices_db=pg.url) as b:
        yield a, b


def speak(url: str, voice: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/speech", json={"voice": voice, "input": "Hi.", "response_format": "pcm"},
                      timeout=60)


@pytest.mark.parametrize("replicas", ["postgres"], indirect=True)
def test_schema_is_created_once_and_versioned(replicas, pg):
    import psycopg

    with psycopg.connect(pg.url) as c:
        assert c.execute("SELECT version FROM openchroma_schema").fetchall() == [(1,)]
    (a, _), (b, _) = replicas
    assert httpx.get(f"{a}/v1/voices").json()["data"] == httpx.get(f"{b}/v1/voices").json()["data"] == []


def test_add_use_replace_delete_across_replicas(replicas, tmp_path, request):
    (a, sa), (b, sb) = replicas
    r = upload(a, "alice")
    assert r.status_code == 201, r.text
    assert httpx.get(f"{b}/v1/voices/alice").json() == r.json()          # listed by the other replica at once
    audio = httpx.get(f"{b}/v1/voices/alice/audio")
    assert audio.content == SPEECH_WAV.read_bytes()
    assert audio.headers["content-type"] == "audio/wav"
    assert audio.headers["content-disposition"] == 'inline; filename="alice.wav"'

    assert speak(b, "alice").status_code == 200                           # and usable there
    first = sb.engine.voices["alice"]
    assert first.transcript == TRANSCRIPT
    if request.node.callspec.params["replicas"] == "postgres":
        assert not (tmp_path / "a" / "voices").exists()                  # nothing stored on local disk

    # Replace it (delete + add again) through A: B's cached prompt is dropped and the new one used.
    assert httpx.delete(f"{a}/v1/voices/alice").status_code == 200
    assert upload(a, "alice", transcript="Another sentence entirely.").status_code == 201
    assert speak(b, "alice").status_code == 200
    assert sb.engine.voices["alice"] is not first
    assert sb.engine.voices["alice"].transcript == "Another sentence entirely."

    # Delete it through B: gone on A too, for the library and for speaking.
    assert httpx.delete(f"{b}/v1/voices/alice").status_code == 200
    error(speak(a, "alice"), 404, "voice_not_found")
    assert "alice" not in sa.engine.voices
    error(httpx.get(f"{a}/v1/voices/alice"), 404, "voice_not_found")


def test_concurrent_adds_of_one_name(replicas):
    """Two replicas add the same name at once: exactly one wins, the other answers 409, both then agree."""
    (a, sa), (b, sb) = replicas
    results: dict[str, httpx.Response] = {}
    go = threading.Barrier(2)

    def add(url: str) -> None:
        go.wait()
        results[url] = upload(url, "twin")

    threads = [threading.Thread(target=add, args=(u,)) for u in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results.values())
    assert codes == [201, 409], [r.text for r in results.values()]
    assert [v["name"] for v in httpx.get(f"{a}/v1/voices").json()["data"]] == ["twin"]
    for url, state in replicas:
        assert speak(url, "twin").status_code == 200
        assert "twin" in state.engine.voices


@pytest.mark.parametrize("replicas", ["postgres"], indirect=True)
def test_lost_database_connection(replicas, pg):
    """The database goes away: library calls answer 503 with a clear reason, registered voices keep speaking;
    once it is back, the library works again without a restart."""
    (a, _), (b, _) = replicas
    assert upload(a, "kept").status_code == 201
    assert speak(b, "kept").status_code == 200
    pg.stop()
    try:
        msg = error(httpx.get(f"{a}/v1/voices"), 503, "voice_store_unavailable")
        assert "unreachable" in msg and "127.0.0.1" in msg
        error(upload(b, "new"), 503, "voice_store_unavailable")
        assert speak(b, "kept").status_code == 200                       # the cached voice still serves
    finally:
        pg.start()
    assert [v["name"] for v in httpx.get(f"{a}/v1/voices").json()["data"]] == ["kept"]
    assert upload(b, "new").status_code == 201
    assert speak(a, "new").status_code == 200


def test_a_legacy_sqlite_index_is_migrated(tiny_chroma, tmp_path):
    """An index written before versions existed (no version column, user_version 0) is upgraded in place and
    its voices still load and speak."""
    import sqlite3

    with chroma_server(tiny_chroma, tmp_path) as (url, _):
        assert upload(url, "old").status_code == 201
    with sqlite3.connect(tmp_path / "voices" / "index.sqlite3") as c:
        c.execute("ALTER TABLE voices DROP COLUMN version")
        c.execute("PRAGMA user_version = 0")
    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        assert [v["name"] for v in httpx.get(f"{url}/v1/voices").json()["data"]] == ["old"]
        assert speak(url, "old").status_code == 200
    with sqlite3.connect(tmp_path / "voices" / "index.sqlite3") as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "version" in [r[1] for r in c.execute("PRAGMA table_info(voices)")]

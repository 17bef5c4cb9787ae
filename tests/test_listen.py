"""``openchroma listen``: the blind A/B listening page (real HTTP server on 127.0.0.1, headless Chromium) and
the preference summary with 95% Wilson intervals.

The two "systems" are tones of different pitch, so the test can tell which system a page clip is by fetching its
bytes, exactly what a listener cannot see from the page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from openchroma.cli import main
from openchroma.eval.listen import read_pairs, start_server, summarize_answers, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
SPEECH_WAV = ROOT / "tests" / "data" / "speech.wav"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"


def tone(path: Path, hz: float, seconds: float = 0.5, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    shutil.copy(SPEECH_WAV, tmp_path / "ref.wav")
    tone(tmp_path / "chroma.wav", 220)
    tone(tmp_path / "other.wav", 330)
    lines = ["# item|reference_wav|system_a|wav_a|system_b|wav_b"]
    lines += [f"item{i}|ref.wav|chroma|chroma.wav|other|other.wav" for i in range(10)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.txt"


def system_of(client: httpx.Client, url: str, pairs_dir: Path) -> str:
    body = client.get(url).content
    for name in ("chroma", "other"):
        if body == (pairs_dir / f"{name}.wav").read_bytes():
            return name
    raise AssertionError(f"{url} is neither system's clip")


def test_summary_is_right_for_a_known_set_of_answers(pairs_file, tmp_path, capsys):
    """One listener prefers chroma 6 times, the other system 3 times and has no preference once (NCMOS)."""
    out = tmp_path / "answers"
    server = start_server(read_pairs(pairs_file), out, questions=["ncmos"], seed=1)
    wanted = ["chroma"] * 6 + ["other"] * 3 + [None]
    try:
        with httpx.Client(base_url=server.url) as client:
            for preferred in wanted:
                trial = client.get("/api/next", params={"rater": "ann"}).json()
                assert not trial["finished"] and trial["question"] == "ncmos"
                assert "chroma" not in str(trial) and "other" not in str(trial)  # blind: no system names
                first, second = (system_of(client, c, pairs_file.parent) for c in trial["clips"])
                assert {first, second} == {"chroma", "other"}
                assert client.get(trial["reference"]).content == SPEECH_WAV.read_bytes()
                choice = "same" if preferred is None else ("first" if preferred == first else "second")
                assert client.post("/api/answer", json={"token": trial["token"], "choice": choice}).json()["ok"]
            assert client.get("/api/next", params={"rater": "ann"}).json()["finished"]
            # Bad answers are refused and stored nowhere.
            assert client.post("/api/answer", json={"token": "nope", "choice": "first"}).status_code == 404
            t = client.get("/api/next", params={"rater": "bob"}).json()["token"]
            assert client.post("/api/answer", json={"token": t, "choice": "maybe"}).status_code == 400
    finally:
        server.shutdown()
        server.store.close()

    summary = summarize_answers(out)
    (c,) = summary["comparisons"]
    assert c["question"] == "ncmos" and c["systems"] == ["chroma", "other"] and c["answers"] == 10
    assert c["raters"] == 1
    got = {o["outcome"]: (o["count"], o["percent"]) for o in c["outcomes"]}
    assert got == {"chroma preferred": (6, 60.0), "other preferred": (3, 30.0), "no preference": (1, 10.0)}
    # Wilson 95% interval for 6/10, as published in textbook tables: 31.3% to 83.2%.
    lo, hi = c["outcomes"][0]["ci95"]
    assert (round(lo, 1), round(hi, 1)) == (31.3, 83.2)

    assert main(["listen", "--summary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NCMOS" in printed and "10 answers from 1 listener" in printed
    assert "chroma preferred" in printed and "60.0%" in printed and "31.3% to  83.2%" in printed
    assert "30.0%" in printed and "no preference" in printed and "10.0%" in printed


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 5), (1, 10), (3, 10), (7, 7), (40, 97)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


def test_bad_pairs_files_are_rejected(tmp_path, capsys):
    assert main(["listen", "--pairs", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "pairs file not found" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("item1|ref.wav|a|a.wav|b\n")
    assert main(["listen", "--pairs", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "expected 6 non-empty fields" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("item1|ref.wav|a|a.wav|b|b.wav\n")
    assert main(["listen", "--pairs", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "audio not found" in capsys.readouterr().err
    assert main(["listen", "--summary", str(tmp_path / "nothing-here")]) == 1
    assert "no answers database" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.browser
def test_listening_page_in_headless_chromium(pairs_file, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    lines = pairs_file.read_text().splitlines()[:4]  # 3 pairs x 2 questions = 6 trials
    pairs_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers"
    server = start_server(read_pairs(pairs_file), out, seed=3)
    clicked: list[tuple[str, str]] = []  # (question, preferred system) as the test meant it
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page(viewport={"width": 900, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.fill("#rater", "carol")
            page.click("#begin")
            with httpx.Client(base_url=server.url) as client:
                for n in range(6):
                    page.wait_for_function(f"() => window.__listen.answered === {n} && window.__listen.token")
                    assert page.locator("#progress").text_content() == f"Trial {n + 1} of 6"
                    buttons = page.locator(".choices button")
                    assert all(buttons.nth(i).is_disabled() for i in range(3))  # not before both clips played
                    question = page.locator("#question").text_content()
                    srcs = page.evaluate("() => [clip1.src, clip2.src]")
                    systems = [system_of(client, s, pairs_file.parent) for s in srcs]
                    page.evaluate("() => { clip1.play(); clip2.play(); }")
                    page.wait_for_function("() => !document.querySelector('.choices button').disabled")
                    if n == 0:
                        ARTIFACTS.mkdir(exist_ok=True)
                        page.screenshot(path=str(ARTIFACTS / "listen-page.png"), full_page=True)
                    # Always prefer the lower tone ("chroma"), wherever the random order put it; once, no preference.
                    if n == 5:
                        page.click("button[data-choice=same]")
                        clicked.append((question, None))
                    else:
                        pos = systems.index("chroma")
                        page.click(f"button[data-choice={'first' if pos == 0 else 'second'}]")
                        clicked.append((question, "chroma"))
                page.locator("#finished").wait_for(state="visible")
            assert errors == []
            browser.close()
    finally:
        server.shutdown()
        server.store.close()

    answers = server.store.__class__(out / "answers.sqlite").answers()
    assert len(answers) == 6 and {a["rater"] for a in answers} == {"carol"}
    assert [a["preferred"] for a in answers] == [c[1] for c in clicked]
    assert {a["question"] for a in answers} == {"ncmos", "scmos"}
    firsts = {a["first_system"] for a in answers}
    assert firsts == {"chroma", "other"}, "the clip order should vary between trials"
    by_q = {c["question"]: c for c in summarize_answers(out)["comparisons"]}
    assert by_q["ncmos"]["answers"] == 3 and by_q["scmos"]["answers"] == 3
    total_chroma = sum(c["outcomes"][0]["count"] for c in by_q.values())
    assert total_chroma == 5


def answer_all(url: str, rater: str, choice: str = "first") -> int:
    n = 0
    with httpx.Client(base_url=url) as client:
        while not (trial := client.get("/api/next", params={"rater": rater}).json())["finished"]:
            assert client.post("/api/answer", json={"token": trial["token"], "choice": choice}).status_code == 200
            n += 1
    return n


def test_reusing_an_answers_dir_serves_the_new_pairs_and_keeps_old_answers(pairs_file, tmp_path):
    out = tmp_path / "answers"
    server = start_server(read_pairs(pairs_file), out, questions=["ncmos"], seed=0)
    try:
        assert answer_all(server.url, "dan") == 10
    finally:
        server.shutdown()
        server.store.close()
    lines = pairs_file.read_text().splitlines()
    new = "new1|ref.wav|chroma|chroma.wav|other|other.wav"
    (pairs_file.parent / "pairs2.txt").write_text("\n".join([*lines[:3], new]) + "\n")
    server = start_server(read_pairs(pairs_file.parent / "pairs2.txt"), out, questions=["ncmos"], seed=0)
    try:
        # dan answered item0 and item1 before: only the new item is left for him; a new listener gets all three.
        assert answer_all(server.url, "dan") == 1
        assert answer_all(server.url, "eve", "same") == 3
    finally:
        server.shutdown()
        server.store.close()
    (c,) = summarize_answers(out)["comparisons"]
    assert c["answers"] == 14 and c["raters"] == 2
    assert {o["outcome"]: o["count"] for o in c["outcomes"]}["no preference"] == 3


def test_listen_reports_a_taken_port(pairs_file, tmp_path, capsys):
    server = start_server(read_pairs(pairs_file), tmp_path / "a", seed=0)
    try:
        port = server.server_address[1]
        assert main(["listen", "--pairs", str(pairs_file), "--out", str(tmp_path / "b"), "--port", str(port)]) == 1
        assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.store.close()


def test_the_page_answers_bad_requests_with_json_errors(pairs_file, tmp_path):
    server = start_server(read_pairs(pairs_file), tmp_path / "a", seed=0)
    try:
        with httpx.Client(base_url=server.url) as client:
            r = client.get("/no/such/page")
            assert r.status_code == 404 and r.json() == {"error": "not found"}
            r = client.post("/api/answer", content=b"{" + b" " * 5000 + b"}")
            assert r.status_code == 413 and r.json() == {"error": "request too large"}
            assert client.get("/api/next").json() == {"error": "rater is required"}
            assert client.get("/audio/nope/1").status_code == 404
            page = client.get("/")
            assert page.headers["cache-control"] == "no-store" and page.headers["content-type"].startswith("text/html")
    finally:
        server.shutdown()
        server.store.close()

"""OpenChroma on Ray Serve: a local Ray cluster runs 2 replicas of a random tiny checkpoint (half a CPU each);
through Serve's proxy, realtime sessions land on both replicas (the X-OpenChroma-Replica header), a voice added
once serves sessions on both, and a chat completion streams."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_harness import SPEECH_WAV, free_port
from test_serve_voices import TRANSCRIPT

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[scale]')")
websockets_sync = pytest.importorskip("websockets.sync.client")

pytestmark = pytest.mark.slow
HEADER = "x-openchroma-replica"


@pytest.fixture(scope="module")
def cluster(tiny_random_dir, tmp_path_factory):
    from ray import serve

    from openchroma.serving.config import ServerConfig
    from openchroma.serving.ray_app import APP_NAME, application

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(model=str(tiny_random_dir), device="cpu", model_id="chroma-tiny", replicas=2,
                              replica_cpus=0.5, max_sessions=4, max_response_seconds=1.0,
                              data_dir=tmp_path_factory.mktemp("ray-data"))
        serve.run(application(config), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while httpx.get(f"{url}/health", timeout=10).status_code != 200:
            assert time.time() < deadline, "the replicas never became healthy"
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_every_response_names_its_replica_and_health_answers(cluster):
    r = httpx.get(f"{cluster}/health", timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ok"
    assert r.headers[HEADER] == body["replica"]
    view = body["cluster"]   # what every replica reported: both, with their session limits
    assert (view["replicas"], view["healthy"], view["capacity"]) == (2, 2, 8), view
    replicas = {m["replica"] for m in view["members"]}
    assert r.headers[HEADER] in replicas
    metrics = httpx.get(f"{cluster}/metrics", timeout=10).text   # every replica's, labelled
    for replica in replicas:
        assert f'openchroma_sessions_rejected_total{{replica="{replica}"}} 0.0' in metrics
    assert metrics.count("# TYPE openchroma_sessions_rejected_total counter") == 1
    assert httpx.get(f"{cluster}/v1/nope", timeout=10).headers[HEADER]   # errors too


def test_a_voice_added_once_serves_realtime_sessions_on_both_replicas(cluster):
    """Sessions held open at once spread over both replicas (each WebSocket is an ongoing request there), and
    each of them speaks in the voice added through one replica."""
    r = httpx.post(f"{cluster}/v1/voices", data={"name": "shared", "transcript": TRANSCRIPT},
                   files={"file": ("ref.wav", SPEECH_WAV.read_bytes(), "audio/wav")}, timeout=60)
    assert r.status_code == 201, r.text
    added_on = r.headers[HEADER]
    ws_url = cluster.replace("http", "ws") + "/v1/realtime?model=chroma-tiny"
    conns = [websockets_sync.connect(ws_url, open_timeout=30) for _ in range(4)]
    try:
        replicas = {c.response.headers[HEADER] for c in conns}
        assert len(replicas) == 2, replicas
        assert added_on in replicas
        for c in conns:
            assert json.loads(c.recv(timeout=30))["type"] == "session.created"
            c.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "audio": {"output": {"voice": "shared"}}}}))
            ev = json.loads(c.recv(timeout=30))
            assert ev["type"] == "session.updated", ev
            assert ev["session"]["audio"]["output"]["voice"] == "shared"
            c.send(json.dumps({"type": "response.create"}))
            kinds = []
            while (ev := json.loads(c.recv(timeout=60)))["type"] != "response.done":
                assert ev["type"] != "error", ev
                kinds.append(ev["type"])
            assert "response.output_audio.delta" in kinds   # random weights: noise, cut at the response cap
            assert ev["response"]["status"] in ("completed", "incomplete"), ev
    finally:
        for c in conns:
            c.close()


def test_openai_sdk_realtime_sessions_land_on_both_replicas(cluster):
    """The official SDK's realtime sessions through the proxy, held at once, are spread over both replicas (as
    the cluster view in /health counts them, from each replica's health-check report)."""
    from contextlib import ExitStack

    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster}/v1", api_key="unused")
    with ExitStack() as stack:
        conns = [stack.enter_context(client.realtime.connect(model="chroma-tiny")) for _ in range(4)]
        for conn in conns:
            assert conn.recv().type == "session.created"

        def spread() -> bool:
            members = httpx.get(f"{cluster}/health", timeout=10).json()["cluster"]["members"]
            return sum(m["sessions"] for m in members) == 4 and all(m["sessions"] >= 1 for m in members)

        wait_for(spread, "4 SDK sessions over both replicas", timeout=30)


def test_chat_completion_streams_through_the_proxy(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster}/v1", api_key="unused")
    stream = client.chat.completions.create(model="chroma-tiny", messages=[{"role": "user", "content": "Hi"}],
                                            modalities=["text", "audio"], audio={"voice": "shared",
                                                                                "format": "pcm16"},
                                            stream=True, max_tokens=8)
    chunks = list(stream)
    assert len(chunks) >= 2
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason is not None


def replica_actor(replica: str):
    from openchroma.serving.ray_app import APP_NAME

    return ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{APP_NAME}#{replica}", namespace="serve")


def running_replicas() -> int:
    from ray import serve

    from openchroma.serving.ray_app import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None or APP_NAME not in app.deployments:
        return 0
    return app.deployments[APP_NAME].replica_states.get("RUNNING", 0)


def wait_for(predicate, what: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_killed_replica_closes_its_sessions_and_is_replaced(cluster):
    """Kill one replica's process: its WebSockets close, the other replica's sessions go on, reconnecting
    succeeds, and Serve starts a replacement."""
    from websockets.exceptions import ConnectionClosed

    ws_url = cluster.replace("http", "ws") + "/v1/realtime?model=chroma-tiny"
    conns = [websockets_sync.connect(ws_url, open_timeout=30) for _ in range(4)]
    try:
        by_replica: dict[str, list] = {}
        for c in conns:
            assert json.loads(c.recv(timeout=30))["type"] == "session.created"
            by_replica.setdefault(c.response.headers[HEADER], []).append(c)
        assert len(by_replica) == 2, list(by_replica)
        victim, survivor = sorted(by_replica)
        ray.kill(replica_actor(victim), no_restart=True)
        for c in by_replica[victim]:
            with pytest.raises(ConnectionClosed):
                while True:
                    c.recv(timeout=30)
            print(f"killed replica's client closed with {c.close_code} {c.close_reason!r}")
            assert c.close_code is not None
        for c in by_replica[survivor]:   # unaffected
            c.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "x"}}))
            assert json.loads(c.recv(timeout=30))["type"] == "session.updated"
        with websockets_sync.connect(ws_url, open_timeout=30) as again:
            assert json.loads(again.recv(timeout=30))["type"] == "session.created"
            assert again.response.headers[HEADER] != victim
    finally:
        for c in conns:
            c.close()

    def replaced() -> bool:   # two live replicas answer, neither of them the killed one
        seen = {httpx.get(f"{cluster}/health", timeout=10).headers[HEADER] for _ in range(20)}
        return len(seen) == 2 and victim not in seen

    wait_for(replaced, "Serve to replace the killed replica")


def test_autoscaling_follows_live_sessions(cluster, tiny_random_dir, tmp_path):
    """1 replica while idle; sessions past the target (0.75 x 2 per replica) bring a second; idle again, back to 1."""
    from ray import serve

    from openchroma.serving.config import ServerConfig
    from openchroma.serving.ray_app import APP_NAME, application

    config = ServerConfig(model=str(tiny_random_dir), device="cpu", model_id="chroma-tiny", min_replicas=1,
                          max_replicas=2, replica_cpus=0.5, max_sessions=2, max_response_seconds=1.0,
                          drain_seconds=2, data_dir=tmp_path)
    serve.run(application(config, upscale_delay_s=1, downscale_delay_s=3, metrics_interval_s=0.5,
                          look_back_period_s=2), name=APP_NAME, route_prefix="/")
    wait_for(lambda: running_replicas() == 1, "one replica when idle")
    ws_url = cluster.replace("http", "ws") + "/v1/realtime?model=chroma-tiny"
    conns = [websockets_sync.connect(ws_url, open_timeout=30) for _ in range(2)]
    try:
        for c in conns:
            assert json.loads(c.recv(timeout=30))["type"] == "session.created"
        wait_for(lambda: running_replicas() == 2, "a second replica under load")
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: running_replicas() == 1, "scale-down when idle")


def test_an_upgrade_drains_live_sessions(cluster, tiny_random_dir, tmp_path):
    """A rolling upgrade (new settings): the old replica takes no new sessions, its live session goes on until
    --drain-seconds, and new sessions land on the new replica."""
    from ray import serve

    from openchroma.serving.config import ServerConfig
    from openchroma.serving.ray_app import APP_NAME, application

    def deploy(max_response_seconds: float) -> None:
        config = ServerConfig(model=str(tiny_random_dir), device="cpu", model_id="chroma-tiny", replicas=1,
                              replica_cpus=0.5, max_sessions=2, max_response_seconds=max_response_seconds,
                              drain_seconds=8, data_dir=tmp_path)
        serve.run(application(config), name=APP_NAME, route_prefix="/")

    deploy(1.0)
    wait_for(lambda: running_replicas() == 1, "one replica")
    ws_url = cluster.replace("http", "ws") + "/v1/realtime?model=chroma-tiny"
    with websockets_sync.connect(ws_url, open_timeout=60) as old:
        assert json.loads(old.recv(timeout=30))["type"] == "session.created"
        before = old.response.headers[HEADER]
        # Changed settings: Serve starts a new replica, then drains the old one (serve.run waits for all of it).
        upgrade = threading.Thread(target=deploy, args=(1.5,))
        upgrade.start()
        t0 = time.time()

        def new_replica_serves() -> bool:
            return httpx.get(f"{cluster}/health", timeout=10).headers.get(HEADER) not in (None, before)

        wait_for(new_replica_serves, "the upgraded replica")
        with websockets_sync.connect(ws_url, open_timeout=60) as new:
            assert new.response.headers[HEADER] != before
        old.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "x"}}))
        assert json.loads(old.recv(timeout=30))["type"] == "session.updated"   # still served while draining
        from websockets.exceptions import ConnectionClosed

        with pytest.raises(ConnectionClosed):
            while True:
                old.recv(timeout=60)
        print(f"drained session closed after {time.time() - t0:.1f} s with {old.close_code} {old.close_reason!r}")
        assert old.close_code is not None
        upgrade.join(60)

@pytest.mark.parametrize("manifest", ["deploy/ray/serve.yaml", "deploy/kubernetes/rayservice.yaml"])
def test_deploy_manifests_build_the_application(manifest, monkeypatch):
    """The Serve configs in deploy/ name our builder, and their args make a valid configuration: one GPU per
    replica, the session limit as max_ongoing_requests, autoscaling at 0.75 x that."""
    import importlib

    import yaml
    from server_harness import ROOT

    docs = list(yaml.safe_load_all((ROOT / manifest).read_text()))
    serve_config = docs[0] if "applications" in docs[0] else yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, name = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), name).__name__ == "build_app"

    from openchroma.serving.ray_app import config_from_dict, deployment_options

    monkeypatch.setenv("OPENCHROMA_VOICES_DB", "postgresql://u:p@db/voices")
    config = config_from_dict(app["args"])
    opts = deployment_options(config)
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["max_ongoing_requests"] == config.max_sessions == 8
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 6
    assert config.voices_db is not None

"""OpenChroma on Ray Serve: engine replicas behind one endpoint, autoscaled on live sessions.

Each replica builds the same FastAPI app (``app.create_app``) around its own ``Engine`` (``serve.ingress`` with a
late-bound builder, so the app is constructed on the replica, after its model has loaded). Ray Serve's proxy
routes HTTP and WebSockets; a realtime WebSocket is one ongoing request for its whole life, so it stays on its
replica, and ``max_ongoing_requests`` is the replica's session limit. Every response and WebSocket handshake
names its replica in ``X-OpenChroma-Replica``. Voices are shared through the voice store (``--voices-db`` for
PostgreSQL across machines; the default SQLite store is safe for replicas on one machine).

``openchroma serve --replicas N`` (or ``--min-replicas/--max-replicas``, ``--ray-address``) runs
``serve_on_ray``; ``serve run deploy/ray/serve.yaml`` uses ``build_app``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import time
import typing
from pathlib import Path
from typing import Any

import ray
from ray import serve

from ..config import RANDOM_DEMO_SECONDS, is_random_checkpoint
from .config import ServerConfig

log = logging.getLogger("openchroma.serve.ray")

REPLICA_HEADER = b"x-openchroma-replica"
APP_NAME = "openchroma"
HEALTH_PERIOD_S = 5.0
_HEADED = ("http.response.start", "websocket.accept", "websocket.http.response.start")


class ReplicaHeader:
    """ASGI middleware: ``X-OpenChroma-Replica`` on every HTTP response and WebSocket handshake."""

    def __init__(self, app: Any, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] in _HEADED:
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.replica)]}
            await send(message)

        await self.app(scope, receive, send_named)


@ray.remote(num_cpus=0)
class ClusterView:
    """What each replica last reported (sessions, capacity), so ``/health`` on any replica can show the cluster;
    a replica that stopped reporting (dead, drained) drops out after ``max_age`` seconds."""

    def __init__(self) -> None:
        self.replicas: dict[str, tuple[float, dict[str, Any], str]] = {}

    def report(self, replica: str, stats: dict[str, Any], metrics: str) -> None:
        self.replicas[replica] = (time.time(), stats, metrics)

    def _live(self, max_age: float) -> dict[str, tuple[float, dict[str, Any], str]]:
        now = time.time()
        self.replicas = {r: v for r, v in self.replicas.items() if now - v[0] <= max_age}
        return self.replicas

    def metrics(self, max_age: float) -> dict[str, str]:
        return {r: m for r, (_, _, m) in self._live(max_age).items()}

    def view(self, max_age: float) -> dict[str, Any]:
        live = [{"replica": r, **s} for r, (_, s, _) in sorted(self._live(max_age).items())]
        ok = [m for m in live if m["status"] == "ok"]
        return {"replicas": len(live), "healthy": len(ok), "sessions": sum(m["sessions"] for m in live),
                "capacity": sum(m["max_sessions"] for m in ok), "members": live}


def cluster_view() -> Any:
    return ClusterView.options(name=f"{APP_NAME}-cluster-view", namespace="serve", get_if_exists=True,
                               lifetime="detached").remote()


@serve.ingress()
class OpenChromaReplica:
    """One replica: loads the engine in its constructor (the replica takes traffic once it is ready), then hands
    Ray Serve the app; ``check_health`` lets Serve replace a replica whose engine stopped answering."""

    def __init__(self, config: ServerConfig):
        from ..cli_args import resolve_dtype
        from .app import create_app

        self.replica_id = serve.get_replica_context().replica_tag
        if config.dtype is None:   # resolved here, on the replica's own device
            config = dataclasses.replace(config, dtype=resolve_dtype(None, config.device))
        app = create_app(config)
        self.state = app.state.oc
        self.state.load()
        if self.state.engine is None:
            raise RuntimeError(f"replica {self.replica_id}: the model failed to load: {self.state.load_error}")
        self.view = cluster_view()
        self._report("ok")
        _add_cluster_health(app, self.replica_id, self.view)
        _add_cluster_metrics(app, self.replica_id, self.view)
        app.add_middleware(ReplicaHeader, replica=self.replica_id)
        self.built_app = app   # (not self.app: Serve's wrapper has that property)
        log.info("replica %s ready (%s)", self.replica_id, config.model)

    def __serve_build_asgi_app__(self):
        return self.built_app

    def _report(self, status: str) -> None:
        engine = self.state.engine
        self.view.report.remote(self.replica_id, {"status": status, "sessions": len(engine.sessions),
                                                  "max_sessions": engine.max_sessions}, _text(self.state.metrics))

    async def check_health(self) -> None:
        """Serve's periodic health check (a failing replica is replaced); also reports to the cluster view."""
        problem = await self.state.engine_problem()
        self._report("ok" if problem is None else "error")
        if problem is not None:
            raise RuntimeError(problem)


def _text(metrics: Any) -> str:
    out = metrics.render()
    return out.decode() if isinstance(out, bytes) else out


_SAMPLE = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?(\s.*)")


def merge_metrics(texts: dict[str, str]) -> str:
    """Several replicas' Prometheus text as one exposition: each family's HELP and TYPE once, then every
    replica's samples with a ``replica`` label."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                family = parts[2] if len(parts) > 2 else family
                seen = headers.setdefault(family, [])
                if parts[1] not in (h.split(" ", 2)[1] for h in seen):
                    seen.append(line)
                samples.setdefault(family, [])
            elif (m := _SAMPLE.fullmatch(line.strip())) and family is not None:
                name, labels, rest = m.groups()
                label = f'replica="{replica}"' + (f",{labels}" if labels else "")
                samples[family].append(f"{name}{{{label}}}{rest}")
    return "".join("\n".join([*headers[f], *samples[f]]) + "\n" for f in headers)


def _add_cluster_metrics(app: Any, replica: str, view: Any) -> None:
    """``GET /metrics`` through the proxy: every live replica's metrics, labelled by replica (the others' as of
    their last health check, at most ``HEALTH_PERIOD_S`` old; this replica's fresh)."""
    from fastapi.responses import Response
    from fastapi.routing import APIRoute

    local = next(r.endpoint for r in app.routes if getattr(r, "path", None) == "/metrics")

    async def metrics():
        own = await local()
        try:
            texts = await asyncio.wait_for(view.metrics.remote(HEALTH_PERIOD_S * 3), HEALTH_PERIOD_S)
        except Exception as e:   # the cluster's metrics are a convenience: this replica's still answer
            log.warning("cluster metrics unavailable: %s", e)
            texts = {}
        texts[replica] = own.body.decode()
        return Response(merge_metrics(texts), media_type=own.media_type)

    app.router.routes.insert(0, APIRoute("/metrics", metrics, methods=["GET"]))


def _add_cluster_health(app: Any, replica: str, view: Any) -> None:
    """``GET /health`` answers as before, plus ``replica`` and ``cluster`` (replicas, sessions, capacity)."""
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    local = next(r.endpoint for r in app.routes if getattr(r, "path", None) == "/health")

    async def health():
        answer = await local()
        body, status = (json.loads(answer.body), answer.status_code) if hasattr(answer, "body") else (answer, 200)
        try:
            cluster = await asyncio.wait_for(view.view.remote(HEALTH_PERIOD_S * 3), HEALTH_PERIOD_S)
        except Exception as e:   # the view is a convenience: the replica's own health still answers
            cluster = {"error": f"{type(e).__name__}: {e}"}
        return JSONResponse({**body, "replica": replica, "cluster": cluster}, status_code=status)

    app.router.routes.insert(0, APIRoute("/health", health, methods=["GET"]))


def uses_cuda(config: ServerConfig) -> bool:
    if config.device is not None:
        return str(config.device).startswith("cuda")
    import torch

    return torch.cuda.is_available()


def deployment_options(config: ServerConfig) -> dict[str, Any]:
    """Ray Serve's options for the replicas: session limit, resources, fixed count or autoscaling, draining."""
    opts: dict[str, Any] = {
        "name": APP_NAME,
        "max_ongoing_requests": config.max_sessions,
        "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": 1 if uses_cuda(config) else 0},
        "health_check_period_s": HEALTH_PERIOD_S,
        "health_check_timeout_s": max(30.0, HEALTH_PERIOD_S * 3),
        "graceful_shutdown_wait_loop_s": 1.0,
        "graceful_shutdown_timeout_s": config.drain_seconds,
    }
    if config.min_replicas is not None or config.max_replicas is not None:
        lo = config.min_replicas if config.min_replicas is not None else 1
        hi = config.max_replicas if config.max_replicas is not None else max(lo, config.replicas, 1)
        if not 0 <= lo <= hi:
            raise ValueError(f"--min-replicas {lo} must be between 0 and --max-replicas {hi}")
        opts["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi,
            "initial_replicas": min(max(config.replicas, lo), hi) if config.replicas else None,
            "target_ongoing_requests": max(1.0, 0.75 * config.max_sessions),
        }
    else:
        opts["num_replicas"] = max(1, config.replicas)
    return opts


def application(config: ServerConfig, **autoscaling: Any):
    """The Serve application: replicas of ``OpenChromaReplica`` built from ``config``; ``autoscaling`` overrides
    Serve's autoscaling settings (e.g. ``upscale_delay_s``, ``downscale_delay_s``)."""
    opts = deployment_options(config)
    if autoscaling and "autoscaling_config" in opts:
        opts["autoscaling_config"].update(autoscaling)
    return serve.deployment(**opts)(OpenChromaReplica).bind(config)


def config_from_dict(args: dict[str, Any]) -> ServerConfig:
    """A ``ServerConfig`` from a Serve config file's ``args`` (YAML scalars and lists)."""
    hints = typing.get_type_hints(ServerConfig)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        if f.name not in args:
            continue
        v = args[f.name]
        if hints[f.name] is Path:
            v = Path(v)
        elif isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    for name, env in (("voices_db", "OPENCHROMA_VOICES_DB"), ("api_key", "OPENCHROMA_API_KEY")):
        if name not in values and os.environ.get(env):   # secrets stay out of the config file
            values[name] = os.environ[env]
    unknown = set(args) - set(values)
    if unknown:
        raise ValueError(f"unknown OpenChroma settings in the Serve config's args: {', '.join(sorted(unknown))}")
    values.setdefault("model_id", Path(str(values.get("model", "chroma"))).name.lower())
    if "max_response_seconds" not in values and is_random_checkpoint(str(values.get("model", ""))):
        values["max_response_seconds"] = RANDOM_DEMO_SECONDS
    return ServerConfig(**values)


def build_app(args: dict[str, Any]):
    """Application builder for ``serve run``/``serve deploy`` (``import_path: openchroma.serving.ray_app:build_app``);
    ``args`` are ``ServerConfig`` fields (``model``, ``max_sessions``, ``voices_db``, ``min_replicas``, ...)."""
    return application(config_from_dict(args))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_on_ray(config: ServerConfig, host: str, port: int) -> int:
    """``openchroma serve --replicas N``: start (or join, with ``--ray-address``) Ray and serve on host:port until
    interrupted."""
    import ray

    if config.ray_address is None and config.voices_db is None:
        log.info("voices: SQLite in %s, shared by the replicas on this machine only (--voices-db for a cluster)",
                 config.data_dir)
    ray.init(address=config.ray_address, ignore_reinit_error=True, log_to_driver=True)
    serve.start(http_options={"host": host, "port": port})
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    opts = deployment_options(config)
    size = opts.get("num_replicas") or opts["autoscaling_config"]
    print(f"OpenChroma on Ray Serve: {config.model}, replicas {size}; loading them (each says ready in the log).\n"
          f"  OpenAI base_url: http://{shown}:{port}/v1   (realtime: ws://{shown}:{port}/v1/realtime)", flush=True)
    # SIGTERM (containers, systemd) and SIGINT (even where a shell started us with it ignored) end the
    # blocking wait below, so that Serve shuts the replicas down (draining them) before Ray stops.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.run(application(config), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("stopping: shutting the replicas down")
    finally:
        serve.shutdown()
    return 0

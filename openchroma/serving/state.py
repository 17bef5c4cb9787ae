"""What every route shares: the server's configuration, its state (the engine, loaded in the background so
``/health`` can say "loading"; the voice library; per-client session counts; metrics) and how routes await the
engine with a time limit."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request

from ..config import RANDOM_WEIGHTS_KEY, is_random_checkpoint
from ..engine import Engine
from .config import ServerConfig, flag  # noqa: F401  (re-exported: routes and tests import them from here)
from .errors import APIError, EngineTimeout, clip, shorten
from .metrics import Metrics
from .voice_library import VoiceLibrary

log = logging.getLogger("openchroma.serve")


def engine_limits(config: ServerConfig) -> dict[str, Any]:
    """The server's limits that the engine enforces too, for engines that take them (``max_conversation_items``
    arrived with issue 18: an older engine does without, and the realtime route still caps its items)."""
    accepted = inspect.signature(Engine.__init__).parameters
    return {k: v for k, v in {"max_conversation_items": config.max_conversation_items}.items() if k in accepted}


def _guard(fn, *args):
    """Run ``fn`` turning exceptions that cannot cross a Future (``StopIteration``) or that are not ``Exception``s
    (``KeyboardInterrupt`` from a worker, ``GeneratorExit``) into ``RuntimeError``, so the caller always hears back."""
    try:
        return fn(*args)
    except (StopIteration, StopAsyncIteration) as e:   # Exceptions, but a Future refuses them: the caller hangs
        raise RuntimeError(f"engine call {getattr(fn, '__name__', fn)!s} raised {type(e).__name__}") from None
    except Exception:
        raise
    except BaseException as e:
        raise RuntimeError(f"engine call {getattr(fn, '__name__', fn)!s} raised {type(e).__name__}: {e}") from None


async def engine_call(config: ServerConfig, fn, *args) -> Any:
    """Run blocking work that computes in the caller's thread (a voice's Mimi encoding, decoding an upload) off
    the event loop; every failure comes back as an exception, and a call that does not return within
    ``config.engine_timeout`` raises ``EngineTimeout`` instead of hanging the caller."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, _guard, fn, *args)
    try:
        return await asyncio.wait_for(fut, timeout=config.engine_timeout if config.engine_timeout > 0 else None)
    except TimeoutError:
        raise EngineTimeout(f"the engine did not answer within {config.engine_timeout:g} s") from None


async def engine_await(config: ServerConfig, awaitable) -> Any:
    """Await an engine command (an ``AsyncSession``'s); one that does not answer within ``config.engine_timeout``
    raises ``EngineTimeout`` instead of hanging the caller."""
    try:
        return await asyncio.wait_for(awaitable, timeout=config.engine_timeout if config.engine_timeout > 0 else None)
    except TimeoutError:
        raise EngineTimeout(f"the engine did not answer within {config.engine_timeout:g} s") from None


async def response_events(config: ServerConfig, resp) -> Any:
    """An engine response's events; raises ``EngineTimeout`` when none comes for ``engine_timeout`` seconds
    (a stopped engine worker would otherwise leave the stream, and its client, waiting forever)."""
    events = resp.__aiter__()
    timeout = config.engine_timeout if config.engine_timeout > 0 else None
    while True:
        try:
            ev = await asyncio.wait_for(events.__anext__(), timeout=timeout)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise EngineTimeout(f"the engine sent nothing for {config.engine_timeout:g} s") from None
        yield ev


class Drain:
    """The shutdown drain: once begun, new requests are refused, live work may finish until ``deadline``, then
    ``expired`` is set and what still runs is ended (realtime sessions with close 1001, SSE streams with an error
    event and ``[DONE]``)."""

    def __init__(self) -> None:
        self.begun = asyncio.Event()
        self.expired = asyncio.Event()
        self.deadline = float("inf")   # time.monotonic() when the grace ends
        self.streams = 0               # SSE streams still open

    def begin(self, grace: float) -> None:
        if not self.begun.is_set():
            self.deadline = time.monotonic() + max(0.0, grace)
            self.begun.set()

    @property
    def draining(self) -> bool:
        return self.begun.is_set()


class ServerState:
    """What the routes share: config, engine (once loaded), voice library, metrics."""

    def __init__(self, config: ServerConfig, engine: Engine | None = None):

        self.config = config
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.load_error: str | None = None   # one line: why the model did not load, and what to do instead
        self.on_load_failure: Callable[[], None] | None = None   # `serve` stops the server (it exits non-zero)
        self.ready = threading.Event()
        self.started = time.time()
        self.connections: set = set()   # open realtime connections
        self.client_sessions: Counter[str] = Counter()   # sessions held per client address
        self.session_clients: dict = {}   # an engine session -> (client address, route) holding it
        self.drain = Drain()
        self.voices = VoiceLibrary(Path(config.data_dir), self.metrics, config.voices_db)
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        self.voices.attach(engine)
        self.engine = engine
        self.ready.set()

    def load(self) -> None:
        """Load the model (with progress bars) and the voice library; run in a background thread."""
        try:
            engine = Engine.from_pretrained(
                self.config.model, device=self.config.device, dtype=self.config.dtype, quantize=self.config.quantize,
                progress=True,
                max_sessions=self.config.max_sessions, max_context=self.config.max_context,
                max_response_frames=self.config.max_response_frames, compile=self.config.compile,
                cuda_graphs=self.config.cuda_graphs, threads=self.config.threads, **engine_limits(self.config))
            self._attach(engine)
            log.info("model %s loaded; %d voices registered", self.config.model, len(engine.voices))
        except BaseException as e:  # reported by /health and every route
            self.load_error = load_failure_line(self.config.model, e)
            log.debug("loading %s failed", self.config.model, exc_info=True)
            if self.on_load_failure is not None:
                self.on_load_failure()
            else:
                log.error("%s", self.load_error)

    @property
    def random_weights(self) -> bool:
        """Whether the model is an init-random checkpoint (it speaks noise): shown by /health, /v1/models, the page."""
        if self.engine is not None:
            return bool(getattr(self.engine.cfg, "raw", {}).get(RANDOM_WEIGHTS_KEY))
        return is_random_checkpoint(self.config.model) if self.config.model else False

    def claim_client_session(self, client: str) -> bool:
        """Count one more session for ``client``; False (nothing counted) when it already holds its cap."""
        cap = self.config.max_sessions_per_client
        if cap > 0 and self.client_sessions[client] >= cap:
            return False
        self.client_sessions[client] += 1
        return True

    def release_client_session(self, client: str) -> None:
        self.client_sessions[client] -= 1
        if self.client_sessions[client] <= 0:
            del self.client_sessions[client]

    def client_limit_error(self) -> APIError:
        self.metrics.sessions_rejected.inc()
        return APIError(429, f"this client already holds {self.config.max_sessions_per_client} sessions (the "
                             "server's --max-sessions-per-client); close one first", "rate_limit_error",
                        "client_session_limit_reached")

    async def engine_problem(self) -> str | None:
        """Why the loaded engine cannot serve (closed, its worker stopped or failing, or it does not answer a no-op
        command within ``HEALTH_PROBE_SECONDS``), or None when it can."""
        engine = self.engine
        if engine is None:
            return None
        problem = engine.problem()
        if problem is not None:
            return problem
        try:
            await asyncio.wait_for(engine.run(lambda: None), HEALTH_PROBE_SECONDS)
        except TimeoutError:
            return f"the engine's worker did not answer within {HEALTH_PROBE_SECONDS:g} s"
        except Exception as e:
            return f"the engine refuses commands: {type(e).__name__}: {e}"
        return None

    def require_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", "server_error", "model_load_failed")
        raise APIError(503, "the model is still loading; retry when GET /health says ready", "server_error",
                       "model_loading")

    def resolve_voice(self, name: str | None) -> str:
        """The library voice to speak in: the one named, else the server's default, else the only one."""
        engine = self.require_engine()
        self.voices.sync()   # voices added, replaced or deleted through another replica
        if isinstance(name, dict):  # OpenAI's {"id": "..."} form
            name = name.get("id")
        if name is not None and not isinstance(name, str):
            raise APIError(400, f"voice must be a voice name, got {clip(name)}", code="invalid_value", param="voice")
        if name is not None and len(name) > 256:
            raise APIError(404, f"unknown voice {clip(name)}", code="voice_not_found", param="voice")
        if name and name in engine.voices:
            return name
        fallback = self.config.default_voice
        library = [v for v in engine.voices if not v.startswith("_adhoc_")]   # not voices cloned per request
        if fallback is None and len(library) == 1:
            fallback = library[0]
        if name and name not in OPENAI_STOCK_VOICES:
            raise APIError(404, f"unknown voice {clip(name)}; voices in the library: "
                                f"{', '.join(sorted(engine.voices)) or 'none'} (add one with POST /v1/voices)",
                           code="voice_not_found", param="voice")
        if fallback is None or fallback not in engine.voices:
            raise APIError(400, "no voice to speak in: the library has "
                                f"{len(engine.voices)} voices and no default; name one (voices: "
                                f"{', '.join(sorted(engine.voices)) or 'none'}) or add one with POST /v1/voices",
                           code="voice_required", param="voice")
        return fallback


HEALTH_PROBE_SECONDS = 5.0

DEMO_COMMAND = "openchroma init-random --preset small --out ./chroma-random && openchroma serve --model ./chroma-random"


def load_failure_line(model: str, error: BaseException) -> str:
    """One line naming why ``model`` did not load and the fix, instead of the hub library's paragraphs."""
    from huggingface_hub import constants
    from huggingface_hub import utils as hub

    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    caused_by = lambda kind: any(isinstance(x, kind) for x in chain)  # noqa: E731
    if caused_by(hub.GatedRepoError):
        cause = "the hub repo is gated (accept its terms on huggingface.co, then set HF_TOKEN)"
    elif caused_by(hub.RepositoryNotFoundError):
        cause = "no such repo on the Hugging Face hub (or it is private: set HF_TOKEN)"
    elif caused_by(hub.RevisionNotFoundError):
        cause = "the hub repo has no such revision"
    elif caused_by((hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
        cause = "it is not in the local Hugging Face cache and " + (
            "HF_HUB_OFFLINE forbids downloading" if constants.HF_HUB_OFFLINE else "the hub cannot be reached")
    else:
        text = (str(error).splitlines() or [""])[0]   # our loader's errors name the file and the problem
        cause = shorten(text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}", 240)
    local = Path(model).expanduser().is_dir()
    fix = "check or re-download that checkpoint" if local else "serve a local checkpoint directory (--model DIR)"
    return f"cannot load the model {model}: {cause}; {fix}, or for a demo with random weights: {DEMO_COMMAND}"


# OpenAI's built-in voice names: clients send them by default, so they map to the server's default voice.
OPENAI_STOCK_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                                 "shimmer", "verse", "marin", "cedar"})


def get_state(request: Request) -> ServerState:
    return request.app.state.oc

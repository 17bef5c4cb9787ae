"""Opening and closing an engine session for a route, in one place: the per-client claim
(``--max-sessions-per-client``), the engine's slot, and the session metrics. Realtime connections and HTTP requests
both go through here."""

from __future__ import annotations

from ..engine import AsyncSession, SessionLimit
from .errors import wire_error
from .state import ServerState, engine_await


async def open_session(state: ServerState, route: str, client: str, voice: str | None,
                       instructions: str | None) -> AsyncSession:
    """A new engine session held by ``client``. Raises ``APIError`` when the client holds its cap (429), every slot
    is taken (503) or the engine does not answer (504); other failures propagate."""
    engine = state.require_engine()
    if not state.claim_client_session(client):
        raise state.client_limit_error()
    try:
        session = await engine_await(state.config, engine.create_async_session(voice, instructions))
    except BaseException as e:
        state.release_client_session(client)
        if isinstance(e, SessionLimit):
            state.metrics.sessions_rejected.inc()
        err = wire_error(e) if isinstance(e, Exception) else None
        if err is not None:
            raise err from None
        raise
    state.session_clients[session] = (client, route)
    state.metrics.sessions_total.labels(route).inc()
    state.metrics.sessions_active.labels(route).inc()
    return session


async def close_session(state: ServerState, session: AsyncSession) -> None:
    """Free ``session``'s engine slot and its client's claim (once; later calls do nothing). An engine that fails to
    close it raises, after the claim and the metrics were released."""
    held = state.session_clients.pop(session, None)
    if held is None:
        return
    client, route = held
    try:
        await engine_await(state.config, session.close())
    finally:
        state.release_client_session(client)
        state.metrics.sessions_active.labels(route).dec()

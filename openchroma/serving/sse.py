"""Server-sent events: one encoder for every streaming route, and the end a stream gets when the server drains."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from .state import ServerState

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One ``data:`` event holding ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def shutdown_error() -> dict[str, Any]:
    return {"error": {"message": "the server is shutting down: this stream was ended before its response finished",
                      "type": "server_error", "code": "server_shutting_down", "param": None}}


async def until_drained(state: ServerState, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` as they come. When the server shuts down and its grace ends before the stream does, the client
    gets an error event and ``[DONE]`` instead of a cut connection, and ``chunks`` is closed (freeing its session)."""
    drain = state.drain
    drain.streams += 1
    source = chunks.__aiter__()
    expired = asyncio.ensure_future(drain.expired.wait())
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(source.__anext__())
            await asyncio.wait({step, expired}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                yield sse(shutdown_error())
                yield DONE
                return
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        expired.cancel()
        drain.streams -= 1
        if step is not None and not step.done():
            # The stream was ended (the client left, or the grace ran out) while waiting for its next chunk: stop
            # that wait, which runs the source's own clean-up (it frees the engine session) in its task.
            step.cancel()
        else:
            with contextlib.suppress(Exception):
                await chunks.aclose()

"""A realtime session's conversation as the client sees it: items by id (create, insert, retrieve, delete,
truncate), capped at ``max_conversation_items``, and user transcripts streamed as the Reasoner writes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import numpy as np

from ..engine import EngineError, TextDelta
from . import realtime_events as ev
from . import realtime_server_events as out
from .errors import shorten
from .realtime_events import RealtimeError
from .realtime_input import MIN_COMMIT_MS, new_id
from .state import response_events

log = logging.getLogger("openchroma.realtime")


class Conversation:
    def __init__(self, core: Any):
        self.core = core   # the owning RealtimeCore (Any: a part never imports its owner)
        self.items: list[dict[str, Any]] = []   # in order, as last reported (the dicts change in place)
        self.transcribing: set[asyncio.Task] = set()

    # ----- lookup ----------------------------------------------------------------------------------------------
    def find(self, item_id: str, param: str = "item_id", code: str = "item_not_found") -> dict[str, Any]:
        found = next((it for it in self.items if it["id"] == item_id), None)
        if found is None:
            raise RealtimeError(f"the conversation has no item with id {item_id[:64]!r}", code, param)
        return found

    def last_id(self) -> str | None:
        return self.items[-1]["id"] if self.items else None

    def previous_id(self, item: dict[str, Any]) -> str | None:
        at = self.items.index(item)
        return self.items[at - 1]["id"] if at else None

    def check_room(self) -> None:
        """Refuse a new item once the conversation holds ``max_conversation_items`` (its prompt would grow without
        bound, and with it every later response's prefill)."""
        cap = self.core.cfg.max_conversation_items
        if cap and len(self.items) >= cap:
            raise RealtimeError(f"the conversation holds {len(self.items)} items, the server's limit "
                                "(--max-conversation-items); delete some (conversation.item.delete) or start a new "
                                "session", "conversation_item_limit_reached")

    # ----- changes ---------------------------------------------------------------------------------------------
    async def add(self, item: dict[str, Any], after: str | None = None) -> None:
        """Put ``item`` in the conversation after item ``after`` ("root": first; None: last) and announce it."""
        if after is None:
            at = len(self.items)
        elif after == "root":
            at = 0
        else:
            at = next(i for i, it in enumerate(self.items) if it["id"] == after) + 1
        prev = self.items[at - 1]["id"] if at else None
        self.items.insert(at, item)
        for event in out.item_added(item, prev):
            await self.core.send(event)

    async def create(self, item: ev.MessageItem, previous_item_id: str | None) -> None:
        core = self.core
        item_id = item.id or new_id("item")
        if any(it["id"] == item_id for it in self.items):
            raise RealtimeError(f"the conversation already has an item with id {item_id!r}",
                                "item_create_duplicate_item_id", "item.id")
        if previous_item_id not in (None, "root"):
            self.find(previous_item_id, "previous_item_id")
        self.check_room()
        at_end = previous_item_id in (None, self.last_id() or "root")
        if core.responses.active() and (item.role != "user" or not at_end):
            raise RealtimeError("a response is in progress: cancel it before adding assistant or system messages or "
                                "inserting into the history", "conversation_already_has_active_response")
        texts, encoded, content = self._content(item)
        audio = {i: await self._audio(data, f"item.content[{i}].audio") for i, data in encoded.items()}
        if audio:
            if not at_end:
                raise RealtimeError("an item with audio can only be added at the end of the conversation",
                                    "invalid_value", "previous_item_id")
            if core.input.buffer_ms:
                raise RealtimeError(f"the input audio buffer holds {core.input.buffer_ms:.0f} ms of audio: commit or "
                                    "clear it before adding an audio item", "input_audio_buffer_not_empty", "item")
            # Parts in order; the engine's turn collects them and ends as one message under the item's id.
            for i, part in enumerate(content):
                if i in audio:
                    await core.call(core.session.append_audio(audio[i], core.input.rate))
                    await core.call(core.session.commit_audio())
                else:
                    await core.call(core.session.add_text(part["text"]))
            await core.call(core.session.end_turn(item_id))
        elif at_end:
            await core.call(core.session.add_message(item.role, "\n".join(texts), item_id))
        else:
            where = 1 if previous_item_id == "root" else previous_item_id
            await core.call(core.session.insert_message(where, item.role, "\n".join(texts), item_id))
        new = out.message_item(item_id, item.role, content)
        await self.add(new, None if at_end else previous_item_id)
        if audio:
            await self.transcribe(new, sum(len(x) for x in audio.values()) / core.input.rate)

    def _content(self, item: ev.MessageItem) -> tuple[list[str], dict[int, str], list[dict[str, Any]]]:
        """An item's texts, its audio parts (base64, by index) and its content as reported back."""
        texts: list[str] = []
        audio: dict[int, str] = {}
        content: list[dict[str, Any]] = []
        for i, part in enumerate(item.content):
            where = f"item.content[{i}]"
            if part.type in ("input_text", "text", "output_text") and part.text and part.text.strip():
                texts.append(part.text)
                content.append({"type": part.type, "text": part.text})
            elif part.type in ("audio", "output_audio") and item.role == "assistant" and part.transcript:
                # An assistant's earlier audio, as its transcript (how clients replay a conversation's history).
                texts.append(part.transcript)
                content.append({"type": part.type, "transcript": part.transcript})
            elif part.type == "input_audio" and item.role == "user":
                if part.audio is None:
                    raise RealtimeError("an audio part needs 'audio': base64 audio in the input format",
                                        "invalid_value", where + ".audio")
                audio[i] = part.audio
                content.append(out.input_audio_content())
            elif part.type in ("input_text", "text", "output_text"):
                raise RealtimeError(f"{where}.text must be a non-empty string", "invalid_value", where + ".text")
            else:
                raise RealtimeError(f"content part type {part.type!r} is not supported for a {item.role} message",
                                    "unsupported_content", where + ".type")
        return texts, audio, content

    async def _audio(self, data: str, param: str) -> np.ndarray:
        samples = await self.core.input.decode_async(data, param)
        if len(samples) < self.core.input.rate * MIN_COMMIT_MS / 1000:
            raise RealtimeError(f"an audio part needs at least {MIN_COMMIT_MS} ms of audio", "invalid_value", param)
        return samples

    async def delete(self, item_id: str) -> None:
        core = self.core
        item = self.find(item_id, code="item_delete_invalid_item_id")
        if core.responses.active():
            raise RealtimeError("a response is in progress: cancel it before deleting items",
                                "conversation_already_has_active_response", "item_id")
        with contextlib.suppress(EngineError):   # the engine forgot it already (a full context drops old turns)
            await core.call(core.session.delete_message(item_id))
        self.items.remove(item)
        await core.send(out.item_deleted(item_id))

    async def retrieve(self, item_id: str) -> None:
        await self.core.send(out.item_retrieved(self.find(item_id, code="item_retrieve_invalid_item_id")))

    async def truncate(self, event: ev.ItemTruncate) -> None:
        core = self.core
        item = self.find(event.item_id)
        if item["role"] != "assistant":
            raise RealtimeError("only assistant items can be truncated", "invalid_value", "item_id")
        if core.responses.active() and item["status"] == "in_progress":
            raise RealtimeError("the response is still in progress: cancel it first", "invalid_value", "item_id")
        text = await core.call(core.session.truncate_response(event.audio_end_ms, item["id"]))
        if item["content"] and "transcript" in item["content"][0]:
            item["content"][0]["transcript"] = text
        await core.send(out.item_truncated(event.item_id, event.content_index, int(event.audio_end_ms)))

    # ----- user transcripts ------------------------------------------------------------------------------------
    async def transcribe(self, item: dict[str, Any], seconds: float) -> None:
        """When the client asked for transcripts, have the Reasoner transcribe the item's newest audio part (already
        encoded for the response) in the engine's background slices, and stream it as it comes."""
        if self.core.settings.transcription is None:
            return
        index = max(i for i, part in enumerate(item["content"]) if part["type"] == "input_audio")
        stream = await self.core.call(self.core.session.transcribe(-1))
        task = asyncio.create_task(self._stream_transcript(stream, item, index, seconds))
        self.transcribing.add(task)
        task.add_done_callback(self.transcribing.discard)

    async def _stream_transcript(self, stream, item: dict[str, Any], index: int, seconds: float) -> None:
        core = self.core
        done = None
        try:
            async for e in response_events(core.cfg, stream):
                if isinstance(e, TextDelta):
                    if e.text:
                        await core.send(out.transcription_delta(item["id"], index, e.text))
                else:
                    done = e
            if done is None or done.error:
                raise RuntimeError(done.error if done is not None else "the transcription ended early")
        except Exception as e:
            log.warning("realtime session %s: transcribing %s failed: %s", core.sid, item["id"], e)
            await core.send(out.transcription_failed(item["id"], index, shorten(str(e))))
            return
        text = done.text.strip()
        item["content"][index]["transcript"] = text
        await core.send(out.transcription_completed(item["id"], index, text, seconds))

    def stop(self) -> None:
        for task in self.transcribing:
            task.cancel()

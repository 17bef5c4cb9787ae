"""LiveKit Agents' OpenAI Realtime plugin (livekit-agents / livekit-plugins-openai 1.8) against a real openchroma
server on loopback.

``RealtimeModel(base_url="http://127.0.0.1:PORT/v1", api_key=..., model=...)`` with its defaults (audio out, voice
"marin", semantic VAD, user transcription with gpt-4o-mini-transcribe), and one ``RealtimeSession`` driven directly,
as ``AgentSession`` drives it, without a LiveKit room. The plugin's contract with the server, in short:
``generate_reply`` resolves only on the ``response.created`` whose ``response.metadata.client_event_id`` echoes the
``response.create``'s event id (else it times out after 10 s); ``update_chat_ctx`` mirrors the server's conversation
through ``conversation.item.added`` / ``conversation.item.deleted`` and edits items by delete + create under the
same id; user transcripts come from ``conversation.item.input_audio_transcription.completed``.
"""

from __future__ import annotations

import asyncio

import pytest
from client_helpers import (
    RATE,
    LiveKitRig,
    connection,
    drain_generation,
    history_text,
    openchroma_server,
    quiet_framework_logs,
    silence_pcm16,
    speech_pcm16,
    until,
    within,
)

pytest.importorskip("livekit.plugins.openai.realtime", reason="livekit-plugins-openai is not installed")

from livekit.agents import llm  # noqa: E402

pytestmark = pytest.mark.clients

quiet_framework_logs()

USER_TEXT = "Hello there! What will the weather be like tomorrow?"


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    """Short responses (1.6 s of audio at most): the tiny model makes them in a fraction of a second."""
    with openchroma_server(tiny_chroma, tmp_path_factory.mktemp("livekit"), max_response_seconds=1.6) as s:
        yield s


@pytest.fixture(scope="module")
def long_server(tiny_chroma, tmp_path_factory):
    """Long responses (30 s of audio at most), still streaming when the user talks over them."""
    with openchroma_server(tiny_chroma, tmp_path_factory.mktemp("livekit-long"), max_response_seconds=30) as s:
        yield s


def question_pcm16() -> bytes:
    """The speech sample's second sentence (a question, one turn): semantic_vad's model (rightly) ends a turn at
    the short pause after its first, "Hello there." (0.64 s), which would split the sample into two turns."""
    return speech_pcm16()[int(0.7 * RATE) * 2:]


def state_session(state, rig: LiveKitRig):
    return connection(state, rig.session_id).session


async def read_message(msg) -> tuple[str, list]:
    """A LiveKit ``MessageGeneration``'s text and audio, read to the end of both streams."""
    async def text():
        return "".join([t async for t in msg.text_stream])

    async def audio():
        return [f async for f in msg.audio_stream]

    return tuple(await asyncio.gather(text(), audio()))


def no_errors(rig: LiveKitRig) -> None:
    assert not rig.errors, f"LiveKit reported errors: {rig.error_messages()}"


async def add_user_text(rig: LiveKitRig, text: str = USER_TEXT, item_id: str = "msg_user_1") -> None:
    """What AgentSession does with typed user input: the message goes into the chat context (update_chat_ctx)."""
    ctx = rig.session.chat_ctx.copy()
    ctx.add_message(role="user", content=text, id=item_id)
    await within(rig.session.update_chat_ctx(ctx), "update_chat_ctx with the user's text", 7)
    assert rig.session.chat_ctx.get_by_id(item_id) is not None, "the user's item is not in the remote chat context"


def test_livekit_text_turn(server):
    """(a) A user text message (conversation.item.create) then generate_reply -> one message generation with 24 kHz
    mono audio frames and a text stream equal to the server's transcript; the chat context mirrors both turns."""
    url, state = server

    async def run():
        async with LiveKitRig(url) as rig:
            await add_user_text(rig)
            gen = await rig.reply("text turn")
            assert gen.user_initiated
            messages = await drain_generation(gen)
            assert len(messages) == 1
            message_id, text, frames = messages[0]
            assert frames, "no assistant audio"
            assert {(f.sample_rate, f.num_channels) for f in frames} == {(24000, 1)}
            done = (await rig.received.wait("response.done"))["response"]
            assert text == done["output"][0]["content"][0]["transcript"]
            assert rig.session.chat_ctx.get_by_id(message_id).text_content == text
            assert history_text(state, rig.session_id) == [("user", USER_TEXT), ("assistant", text)]
            no_errors(rig)

    asyncio.run(run())


def test_livekit_greeting_without_user_input(server):
    """(b) generate_reply(instructions=...) on an empty conversation: a response with no user input at all; the
    server must answer it (audio), not refuse it, and the per-response instructions must not become the session's."""
    url, state = server

    async def run():
        async with LiveKitRig(url) as rig:
            gen = await rig.reply("greeting", instructions="Greet the user warmly.")
            (message_id, text, frames), = await drain_generation(gen)
            assert frames, "the greeting has no audio"
            sent = rig.sent.of("response.create")[-1]
            assert sent["response"]["instructions"] == "Greet the user warmly."
            assert [role for role, _ in history_text(state, rig.session_id)] == ["assistant"]
            system = state_session(state, rig).history[0]["content"][0]["text"]
            assert system != "Greet the user warmly.", "per-response instructions replaced the session's"
            no_errors(rig)

    asyncio.run(run())


def test_livekit_spoken_turn_with_user_transcript(server):
    """(c) Speech then silence through push_audio with the plugin's default semantic VAD: speech started/stopped,
    a server-initiated reply with audio, and the user's transcript
    (conversation.item.input_audio_transcription.completed -> ``input_audio_transcription_completed``, final, for
    the committed item), which the plugin also writes into that item of the chat context."""
    url, state = server

    async def run():
        async with LiveKitRig(url) as rig:
            update = rig.sent.of("session.update")[0]["session"]
            assert update["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
            await rig.push_audio(question_pcm16() + silence_pcm16(1.5))
            gen = await until(lambda: rig.generations and rig.generations[0], "a reply to the spoken turn")
            assert not gen.user_initiated
            (_, _, frames), = await drain_generation(gen)
            assert frames, "the reply has no audio"
            assert rig.speech_started == 1 and rig.speech_stopped == 1
            committed = (await rig.received.wait("input_audio_buffer.committed"))["item_id"]
            final = await until(lambda: rig.transcripts and rig.transcripts[0],
                                "the user's transcript (conversation.item.input_audio_transcription.completed)")
            assert final.item_id == committed and isinstance(final.transcript, str)
            item = rig.session.chat_ctx.get_by_id(committed)
            assert item is not None and item.role == "user" and final.transcript in item.content
            no_errors(rig)

    asyncio.run(run())


def test_livekit_barge_in(long_server):
    """(d) The user talks over a streaming reply: input_speech_started, the reply's streams end (response.done
    ``cancelled``/``turn_detected``), the plugin's truncate(audio_end_ms=...) of what was played is accepted
    (conversation.item.truncated), and the interrupting turn gets its own reply. The interrupting speech comes at a
    microphone's pace until the cancelled reply has ended (as in a live call, where the truncate reaches the server
    long before the user stops talking)."""
    url, state = long_server

    async def run():
        async with LiveKitRig(url) as rig:
            await rig.push_audio(question_pcm16() + silence_pcm16(1.5))
            gen = await until(lambda: rig.generations and rig.generations[0], "a reply to the first turn")
            msg = await within(gen.message_stream.__anext__(), "the reply's message")
            await within(msg.audio_stream.__anext__(), "the reply's first audio frame")
            mark = rig.received.mark()
            ended = asyncio.ensure_future(asyncio.gather(drain_generation(gen), read_message(msg)))
            await rig.push_audio(question_pcm16()[:24000 * 2], realtime_until=lambda: rig.received.of("response.done",
                                                                                                     mark))
            await within(ended, "the end of the interrupted reply's streams")
            assert rig.speech_started >= 2
            done = await rig.received.wait("response.done", since=mark)
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"]["reason"] == "turn_detected"
            rig.session.truncate(message_id=msg.message_id, modalities=["audio"], audio_end_ms=200)
            truncated = await rig.received.wait("conversation.item.truncated", since=mark)
            assert truncated["item_id"] == msg.message_id and truncated["audio_end_ms"] == 200
            await rig.push_audio(question_pcm16()[24000 * 2:] + silence_pcm16(1.5))
            await until(lambda: len(rig.generations) == 2, "a reply to the interrupting turn")
            no_errors(rig)

    asyncio.run(run())


def test_livekit_generate_reply_returns(server):
    """(e) generate_reply sends ``response.create`` with ``response.metadata.client_event_id`` = its event_id and
    returns once a ``response.created`` echoes that metadata (``response.done`` echoes it too)."""
    url, state = server

    async def run():
        async with LiveKitRig(url) as rig:
            await add_user_text(rig)
            gen = await rig.reply("generate_reply")
            sent = rig.sent.of("response.create")[-1]
            assert sent["response"]["metadata"] == {"client_event_id": sent["event_id"]}
            created = rig.received.of("response.created")[-1]["response"]
            assert created["metadata"] == {"client_event_id": sent["event_id"]}
            assert gen.user_initiated and gen.response_id == created["id"]
            await drain_generation(gen)
            done = (await rig.received.wait("response.done"))["response"]
            assert done["id"] == created["id"]
            assert (done.get("metadata") or {}).get("client_event_id") == sent["event_id"]
            no_errors(rig)

    asyncio.run(run())


def test_livekit_chat_context_edit(server):
    """(f) update_chat_ctx: three items created in order (previous_item_id "root", then each one's predecessor);
    then the first edited and the third removed -> conversation.item.delete (third), conversation.item.delete
    (first), conversation.item.create (first, new text, previous_item_id "root"). The server must answer with
    conversation.item.deleted for both and conversation.item.added for the re-created item at the root (no errors),
    so the plugin's mirror and the server's own history are [edited first, second]."""
    url, state = server

    async def run():
        async with LiveKitRig(url) as rig:
            ctx = llm.ChatContext.empty()
            ctx.add_message(role="user", content="first message", id="msg_a")
            ctx.add_message(role="assistant", content="second message", id="msg_b")
            ctx.add_message(role="user", content="third message", id="msg_c")
            await within(rig.session.update_chat_ctx(ctx), "update_chat_ctx creating three items", 7)
            creates = rig.sent.of("conversation.item.create")
            assert [(e["item"]["id"], e["previous_item_id"]) for e in creates] == [
                ("msg_a", "root"), ("msg_b", "msg_a"), ("msg_c", "msg_b")]

            sent_mark, got_mark = rig.sent.mark(), rig.received.mark()
            ctx = rig.session.chat_ctx.copy()
            ctx.items[ctx.index_by_id("msg_a")] = llm.ChatMessage(id="msg_a", role="user",
                                                                  content=["edited first message"])
            ctx.items = [item for item in ctx.items if item.id != "msg_c"]
            await within(rig.session.update_chat_ctx(ctx), "update_chat_ctx editing and removing items", 7)
            sent = [(e["type"], e.get("item_id") or e["item"]["id"], e.get("previous_item_id"))
                    for e in rig.sent.events[sent_mark:]]
            assert sent == [("conversation.item.delete", "msg_c", None), ("conversation.item.delete", "msg_a", None),
                            ("conversation.item.create", "msg_a", "root")], sent
            errors = [e["error"] for e in rig.received.of("error", got_mark)]
            assert not errors, f"the server refused part of the edit: {errors}"
            deleted = {e["item_id"] for e in rig.received.of("conversation.item.deleted", got_mark)}
            assert deleted == {"msg_a", "msg_c"}
            added = rig.received.of("conversation.item.added", got_mark)
            assert [(e["item"]["id"], e["previous_item_id"]) for e in added] == [("msg_a", None)]
            mirror = [(item.id, item.text_content) for item in rig.session.chat_ctx.items]
            assert mirror == [("msg_a", "edited first message"), ("msg_b", "second message")]
            assert history_text(state, rig.session_id) == [
                ("user", "edited first message"), ("assistant", "second message")]
            no_errors(rig)

    asyncio.run(run())


def test_livekit_interruption_at_0_ms_then_next_turn(long_server):
    """(g) A reply interrupted before it surfaced: AgentSession cancels the generate_reply future, so the plugin
    sends ``response.cancel`` at once and, when the ``response.created`` carrying its client_event_id arrives,
    ``response.cancel`` with that ``response_id`` and discards the response (no generation surfaces). The server must
    cancel it, must not make the by-id cancel of an already-cancelled response an error LiveKit reports (LiveKit
    ignores only errors whose message starts with "Cancellation failed"), and the session must stay usable: the
    next generate_reply returns and streams, and interrupt() stops it."""
    url, state = long_server

    async def run():
        async with LiveKitRig(url) as rig:
            mark = rig.received.mark()
            fut = rig.session.generate_reply(instructions="Tell me a long story.")
            fut.cancel()
            done = await rig.received.wait("response.done", "response.done for the cancelled reply", since=mark)
            assert done["response"]["status"] == "cancelled", done["response"]["status"]
            rid = done["response"]["id"]
            await rig.sent.wait("response.cancel", "LiveKit's response.cancel by response_id (it sends it when the "
                                "response.created echoes the cancelled request's client_event_id)",
                                where=lambda e: e.get("response_id") == rid)
            assert not rig.generations, "the cancelled reply surfaced as a generation"

            gen = await rig.reply("the reply after a 0 ms interruption")
            msg = await within(gen.message_stream.__anext__(), "the next reply's message")
            await within(msg.audio_stream.__anext__(), "the next reply's first audio frame")
            rig.session.interrupt()
            await drain_generation(gen)
            final = rig.received.of("response.done")[-1]["response"]
            assert final["id"] == gen.response_id and final["status"] == "cancelled"
            no_errors(rig)

    asyncio.run(run())

"""Pipecat's ``OpenAIRealtimeLLMService`` (pipecat-ai 1.14) against a real openchroma server on loopback.

The service runs in a transport-less pipeline, exactly as an app would configure it for OpenAI but with
``base_url="ws://127.0.0.1:PORT/v1/realtime"`` and any API key. Frames go in at the top; what comes out either way
is recorded. Pipecat treats every server ``error`` event (but ``response_cancel_not_active`` and
``conversation_already_has_active_response``) as fatal: it pushes an ``ErrorFrame`` and stops reading the socket, so
each test also asserts that no ``ErrorFrame`` appeared.
"""

from __future__ import annotations

import asyncio

import pytest
from client_helpers import (
    PipecatRig,
    history_text,
    openchroma_server,
    quiet_framework_logs,
    silence_pcm16,
    speech_pcm16,
    within,
)

pytest.importorskip("pipecat.services.openai.realtime.llm", reason="pipecat-ai[openai] is not installed")

from pipecat.frames.frames import (  # noqa: E402
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    ProposedUserStartedSpeakingFrame,
    ProposedUserStoppedSpeakingFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.services.openai.realtime import events  # noqa: E402

pytestmark = pytest.mark.clients

quiet_framework_logs()

USER_TEXT = "Hello there! What will the weather be like tomorrow?"


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    """Short responses (1.6 s of audio at most): the tiny model makes them in a fraction of a second."""
    with openchroma_server(tiny_chroma, tmp_path_factory.mktemp("pipecat"), max_response_seconds=1.6) as s:
        yield s


@pytest.fixture(scope="module")
def long_server(tiny_chroma, tmp_path_factory):
    """Long responses (30 s of audio at most), still streaming when the user talks over them."""
    with openchroma_server(tiny_chroma, tmp_path_factory.mktemp("pipecat-long"), max_response_seconds=30) as s:
        yield s


def session_id(rig: PipecatRig) -> str:
    return rig.received.of("session.created")[0]["session"]["id"]


def transcribing() -> events.SessionProperties:
    """What a Pipecat app sets to get user transcripts: ``audio.input.transcription`` (server VAD left on)."""
    return events.SessionProperties(audio=events.AudioConfiguration(
        input=events.AudioInput(transcription=events.InputAudioTranscription())))


def test_pipecat_text_turn(server):
    """(a) A user text message in the context -> conversation.item.create + response.create -> the assistant's
    audio (TTSAudioRawFrame, 24 kHz mono) and its transcript (TTSTextFrame), bracketed by TTSStarted/Stopped."""
    url, state = server

    async def run():
        async with PipecatRig(url) as rig:
            await rig.push(LLMContextFrame(LLMContext(messages=[{"role": "user", "content": USER_TEXT}])))
            await rig.wait(LLMFullResponseEndFrame, "end of the assistant's response (LLMFullResponseEndFrame)",
                           direction="downstream")
            audio = rig.of(TTSAudioRawFrame)
            assert audio, "no assistant audio"
            assert {(f.sample_rate, f.num_channels) for f in audio} == {(24000, 1)}
            assert rig.of(TTSStartedFrame) and rig.of(TTSStoppedFrame)
            done = rig.received.of("response.done")[-1]["response"]
            assert done["status"] in ("completed", "incomplete"), done
            transcript = done["output"][0]["content"][0]["transcript"]
            assert "".join(f.text for f in rig.of(TTSTextFrame)) == transcript
            item = rig.sent.of("conversation.item.create")[0]["item"]
            history = history_text(state, session_id(rig))
            assert history[0] == ("user", USER_TEXT), history
            assert history[-1] == ("assistant", transcript), history
            assert item["content"][0]["text"] == USER_TEXT
            assert not rig.errors()

    asyncio.run(run())


def test_pipecat_greeting_without_user_input(server):
    """(b) The bot speaks first: only a system instruction, an empty context -> session.update(instructions) and a
    response.create with no user input at all; the server must answer it (not refuse it)."""
    url, state = server

    async def run():
        async with PipecatRig(url, system_instruction="Greet the user warmly.") as rig:
            await rig.push(LLMContextFrame(LLMContext()))
            await rig.wait(LLMFullResponseEndFrame, "end of the greeting (LLMFullResponseEndFrame)",
                           direction="downstream")
            assert rig.of(TTSAudioRawFrame), "the greeting has no audio"
            assert not rig.sent.of("conversation.item.create"), "Pipecat sent an item: not a greeting"
            updated = rig.received.of("session.updated")[-1]["session"]
            assert updated["instructions"] == "Greet the user warmly."
            done = rig.received.of("response.done")[-1]["response"]
            assert done["status"] in ("completed", "incomplete"), done
            assert [role for role, _ in history_text(state, session_id(rig))] == ["assistant"]
            assert not rig.errors()

    asyncio.run(run())


def test_pipecat_spoken_turn_with_user_transcript(server):
    """(c) Speech then silence into the service with server VAD: the server detects the turn
    (ProposedUserStarted/StoppedSpeakingFrame), answers it, and transcribes the user's audio: Pipecat turns
    ``conversation.item.input_audio_transcription.completed`` into an upstream TranscriptionFrame."""
    url, state = server

    async def run():
        async with PipecatRig(url, session_properties=transcribing()) as rig:
            update = rig.sent.of("session.update")[0]["session"]
            assert update["audio"]["input"]["transcription"] == {"model": "gpt-realtime-whisper"}
            await rig.push_audio(speech_pcm16() + silence_pcm16(1.5))
            await rig.wait(ProposedUserStartedSpeakingFrame, "speech start (input_audio_buffer.speech_started)")
            await rig.wait(ProposedUserStoppedSpeakingFrame, "speech stop (input_audio_buffer.speech_stopped)")
            await rig.wait(LLMFullResponseEndFrame, "the assistant's reply to the spoken turn",
                           direction="downstream")
            assert rig.of(TTSAudioRawFrame), "the reply has no audio"
            committed = (await rig.received.wait("input_audio_buffer.committed"))["item_id"]
            frame = await rig.wait(TranscriptionFrame, "the user's transcript (TranscriptionFrame from "
                                   "conversation.item.input_audio_transcription.completed)", direction="upstream")
            assert isinstance(frame.text, str)
            assert frame.result.item_id == committed and frame.result.content_index == 0
            assert not rig.errors()

    asyncio.run(run())


def test_pipecat_barge_in(long_server):
    """(d) The user talks over a streaming reply: server VAD's speech_started makes Pipecat send
    conversation.item.truncate for the audio it got; the server cancels the reply (TTSStoppedFrame, response.done
    ``cancelled``/``turn_detected``), accepts the truncate without an error, and answers the interrupting turn.
    The interrupting speech comes at a microphone's pace until Pipecat has sent its truncate (as in a live call,
    where the truncate reaches the server long before the user stops talking)."""
    url, state = long_server

    async def run():
        async with PipecatRig(url) as rig:
            await rig.push_audio(speech_pcm16() + silence_pcm16(1.5))
            await rig.wait(TTSAudioRawFrame, "the first reply's audio")
            mark, sent_mark, got_mark = rig.mark(), rig.sent.mark(), rig.received.mark()
            await rig.push_audio(speech_pcm16() + silence_pcm16(1.5),
                                 realtime_until=lambda: rig.sent.of("conversation.item.truncate", sent_mark))
            await rig.wait(ProposedUserStartedSpeakingFrame, "speech start over the reply", since=mark)
            stopped = await rig.wait(TTSStoppedFrame, "the interrupted reply's end (TTSStoppedFrame)", since=mark)
            done = await rig.received.wait("response.done", since=got_mark)
            assert done["response"]["status"] == "cancelled", done["response"]["status"]
            assert done["response"]["status_details"]["reason"] == "turn_detected"
            truncate = await rig.sent.wait("conversation.item.truncate", "Pipecat's truncate", since=sent_mark)
            truncated = await rig.received.wait("conversation.item.truncated", "conversation.item.truncated",
                                                since=got_mark)
            assert truncated["item_id"] == truncate["item_id"] == done["response"]["output"][0]["id"]
            assert truncated["audio_end_ms"] == truncate["audio_end_ms"]
            await rig.wait(TTSAudioRawFrame, "a reply to the interrupting turn", since=rig.index(stopped) + 1)
            assert not rig.errors()

    asyncio.run(run())


def test_pipecat_interruption_at_0_ms_then_next_turn(long_server):
    """(g) Client-driven turns (turn_detection off): an InterruptionFrame right after the response.create makes
    Pipecat send input_audio_buffer.clear + response.cancel; the server cancels the reply at once and the session
    stays usable: the next turn (audio, commit, response.create on UserStoppedSpeakingFrame) gets an answer."""
    url, state = long_server
    manual = events.SessionProperties(audio=events.AudioConfiguration(input=events.AudioInput(turn_detection=False)))

    async def run():
        async with PipecatRig(url, session_properties=manual) as rig:
            update = rig.sent.of("session.update")[0]["session"]
            assert update["audio"]["input"]["turn_detection"] is None
            await rig.push(LLMContextFrame(LLMContext(messages=[{"role": "user", "content": USER_TEXT}])))
            await rig.sent.wait("response.create", "Pipecat's response.create")
            got_mark = rig.received.mark()
            await rig.push(InterruptionFrame())
            await rig.sent.wait("response.cancel", "Pipecat's response.cancel after the InterruptionFrame")
            await rig.received.wait("input_audio_buffer.cleared", since=got_mark)
            done = await rig.received.wait("response.done", since=0)
            assert done["response"]["status"] == "cancelled", done["response"]["status"]

            mark, got_mark = rig.mark(), rig.received.mark()
            await rig.push_audio(speech_pcm16())
            await rig.push(UserStoppedSpeakingFrame())
            await rig.received.wait("input_audio_buffer.committed", since=got_mark)
            await rig.wait(TTSAudioRawFrame, "a reply to the turn after the interruption", since=mark)
            created = await rig.received.wait("response.created", since=got_mark)
            assert created["response"]["id"] != done["response"]["id"]
            assert not rig.errors()

    asyncio.run(run())


def test_pipecat_retrieve_conversation_item(server):
    """``retrieve_conversation_item``: conversation.item.retrieve -> conversation.item.retrieved with the item; an
    unknown id -> an ``error`` with code ``item_retrieve_invalid_item_id`` and the request's event_id
    (``rci_<item id>``), which Pipecat turns into an exception for the caller and does not treat as fatal."""
    url, state = server

    async def run():
        async with PipecatRig(url) as rig:
            await rig.push(LLMContextFrame(LLMContext(messages=[{"role": "user", "content": USER_TEXT}])))
            await rig.wait(LLMFullResponseEndFrame, "end of the assistant's response", direction="downstream")
            item_id = rig.sent.of("conversation.item.create")[0]["item"]["id"]
            item = await within(rig.llm.retrieve_conversation_item(item_id),
                                "conversation.item.retrieved for the user's item")
            assert item.id == item_id and item.role == "user"
            assert item.content[0].text == USER_TEXT
            try:
                await within(rig.llm.retrieve_conversation_item("item_does_not_exist"),
                             "an item_retrieve_invalid_item_id error for an unknown item")
            except AssertionError:
                raise
            except Exception:   # Pipecat's exception from the error event: what the caller should get
                pass
            else:
                raise AssertionError("retrieving an unknown item succeeded")
            assert not rig.errors()

    asyncio.run(run())

"""The conversation: pure data tested without a thread (prompt ids message by message, edits by id, context
fitting by arithmetic), and the engine's side of it: the item limit, and floods that never stall other users."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from openchroma.engine import AudioChunk, ConversationLimit, Engine, EngineError, ResponseDone
from openchroma.engine.conversation import TOKENIZE_SLICE_CHARS, Conversation
from openchroma.tokenizer import ChatTokenizer, PromptBuilder, build_chat_prompt, system_message, text_message


@pytest.fixture(scope="module")
def tokenizer(tiny_random_dir):
    return ChatTokenizer.from_dir(tiny_random_dir)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PromptBuilder(tokenizer)


class Audio:
    """A committed audio part as the conversation sees it: a placeholder count."""

    def __init__(self, tokens: int):
        self.tokens = tokens


def _random_conversation(rng: random.Random, n: int) -> Conversation:
    conv = Conversation(rng.choice([None, "Be brief.", "x" * 40]))
    for i in range(n):
        role = rng.choice(["user", "user", "assistant", "system"])
        if role == "user" and rng.random() < 0.4:
            conv.add_audio_part(Audio(rng.randint(1, 9)))
            if rng.random() < 0.5:
                conv.add_text_part(rng.choice(["and this", " spaced ", "\n\nnew line"]))
            conv.close_turn(f"u{i}")
        else:
            conv.add_message(role, rng.choice(["Hi.", "How are you today?", "é ü 漢字", "  ", "word " * 30]),
                             item_id=f"m{i}")
    return conv


def _counts(conv: Conversation, messages) -> list[int]:
    by_message = {id(e.message): [a.tokens for a in e.audio] for e in conv.entries}
    return [n for m in messages for n in by_message.get(id(m), [])]


def test_prompt_ids_built_message_by_message_equal_the_whole_conversations(tokenizer, builder):
    rng = random.Random(0)
    for _ in range(60):
        conv = _random_conversation(rng, rng.randint(0, 8))
        messages = conv.messages
        want = build_chat_prompt(tokenizer, messages, _counts(conv, messages))
        assert builder.build(messages, _counts(conv, messages)) == want
        plan = conv.plan()
        while not plan.tokenize_slice(builder, 1 << 30, None, chars=rng.choice([1, 50, 5000])):
            pass
        assert plan.ids(plan.fit(1 << 30, None, 1 << 30))[0] == want
    # A literal special token in a text part cannot split the batch wrongly.
    odd = [text_message("user", "a <|im_start|> b"), text_message("assistant", "ok")]
    assert builder.messages_ids(odd, [[], []]) == [builder.message_ids(m) for m in odd]


def _forget_by_rebuilding(tokenizer, conv: Conversation, budget: int) -> tuple[int, list[int]]:
    """The engine's old way: rebuild the whole prompt, drop the oldest turn, again, until it fits."""
    messages = conv.messages
    start = 1
    while True:
        kept = messages[:1] + messages[start:]
        ids = build_chat_prompt(tokenizer, kept, _counts(conv, kept))
        if len(ids) <= budget or len(kept) < 3:
            return start, ids
        end = next((i for i in range(2, len(kept)) if kept[i]["role"] == "user"), len(kept) - 1)
        start += max(end, 2) - 1


def test_fitting_by_arithmetic_forgets_the_turns_rebuilding_forgot(tokenizer, builder):
    rng = random.Random(1)
    for _ in range(80):
        conv = _random_conversation(rng, rng.randint(1, 14))
        budget = rng.randint(20, 400)
        start, ids = _forget_by_rebuilding(tokenizer, conv, budget)
        plan = conv.plan()
        while not plan.tokenize_slice(builder, budget, None, chars=rng.choice([1, 64, 5000])):
            pass
        if len(ids) > budget:
            with pytest.raises(ValueError, match="leaves no room to answer"):
                plan.fit(budget, None, budget)
            continue
        assert plan.fit(budget, None, budget) == start
        assert plan.ids(start)[0] == ids


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_a_flood_is_tokenized_newest_first_in_bounded_slices_and_only_what_can_fit(builder):
    conv = Conversation(max_items=None)
    for i in range(10_000):
        conv.add_message("user", f"item {i:05d}", item_id=f"i{i}")
    plan = conv.plan()
    slices = 0
    while not plan.tokenize_slice(builder, 4000, None):
        slices += 1
    tokenized = [i for i, e in enumerate(conv.entries) if e.ids is not None]
    assert len(tokenized) < 1000 and tokenized[-1] == 10_000       # the newest, and not the other 9000
    assert slices <= 1000 * (len("item 00000") + 65) // TOKENIZE_SLICE_CHARS + 1
    start = plan.fit(4000, None, 4096)
    assert start > 9000 and len(plan.ids(start)[0]) <= 4000
    conv.forget(start - 1)
    assert conv.messages[1]["id"] == f"i{start - 1}" and conv.items == 10_001 - start
    # The next response tokenizes only what is new: each message is tokenized once.
    conv.add_message("user", "One more.", item_id="new")
    rendered: list[int] = []

    class Counting:
        generation_ids = builder.generation_ids

        def messages_ids(self, messages, counts):
            rendered.append(len(messages))
            return builder.messages_ids(messages, counts)

    again = conv.plan()
    while not again.tokenize_slice(Counting(), 4000, None):
        pass
    assert rendered == [1]


def test_conversation_edits_by_id_and_its_audio_goes_with_its_message():
    conv = Conversation("Be kind.", max_items=4)
    conv.add_audio_part(Audio(5))
    conv.add_text_part("and this")
    assert conv.close_turn("u1") and not conv.close_turn()
    conv.add_message("assistant", "Sure.", item_id="a1")
    conv.insert_message("u1", "system", "Note.", item_id="s1")
    assert [m.get("id") for m in conv.messages] == [None, "u1", "s1", "a1"]
    assert [a.tokens for a in conv.audio] == [5]
    with pytest.raises(EngineError, match="already has a message with id 'a1'"):
        conv.add_message("user", "again", item_id="a1")
    with pytest.raises(EngineError, match="between 1 and 3"):
        conv.delete_message(0)
    conv.add_message("user", "Fourth.", item_id="u2")
    with pytest.raises(ConversationLimit, match="max_conversation_items=4"):
        conv.add_message("user", "Fifth.", item_id="u3")
    conv.delete_message("u1")
    assert conv.audio == [] and conv.items == 3
    conv.add_message("user", "Fifth.", item_id="u3")
    assert conv.replace_text(2, "Su")["content"][0]["text"] == "Su" and conv.messages[2]["id"] == "a1"
    conv.set_system("Be brief.")
    assert conv.messages[0] == system_message("Be brief.")
    plan = conv.plan(system="Other.", messages=[{"role": "user", "text": "Only this."}])
    assert [e.message for e in plan.entries] == [system_message("Other."), text_message("user", "Only this.")]
    assert not plan.forgettable


# ----- the engine's side ----------------------------------------------------------------------------------------
VOICE = (np.random.default_rng(1).standard_normal(24000) * 0.1).astype(np.float32)


def test_the_engine_refuses_items_past_its_limit_with_a_clear_error(tiny_chroma):
    with Engine(tiny_chroma, max_sessions=1, max_context=512, max_response_frames=4,
                max_conversation_items=3) as eng:
        eng.register_voice("v", VOICE, "hello", sample_rate=24000)
        s = eng.create_session("v")
        for i in range(3):
            s.add_message("user", f"Item {i}.", item_id=f"i{i}")
        with pytest.raises(ConversationLimit, match="max_conversation_items=3"):
            s.add_message("user", "One too many.", item_id="i3")
        s.append_audio(np.zeros(16000, np.float32), 16000)
        with pytest.raises(ConversationLimit):
            s.commit_audio("u1")
        s.clear_audio()
        s.delete_message("i0")
        s.add_message("user", "Room again.", item_id="i3")
        # A response makes room for itself and the next item by forgetting the oldest turn.
        assert s.respond().result().frames == 4
        assert len(s.history) - 1 <= 3
        s.add_message("user", "Still possible.", item_id="i4")


def test_a_conversation_flood_never_holds_the_frame_loop(tiny_chroma):
    """Regression (issue 18): 1000 items, then response.create. The prompt used to be rebuilt and re-tokenized
    once per forgotten turn inside one command (a minute of a frozen worker here). Now it is tokenized once per
    message, newest first, in slices between frames: the live stream makes frames while it is prepared."""
    with Engine(tiny_chroma, max_sessions=2, max_context=4096, max_response_frames=2000) as eng:
        eng.register_voice("v", VOICE, "hello", sample_rate=24000)
        flood, live = eng.create_session("v"), eng.create_session("v")
        rng = np.random.default_rng(0)
        words = "the quick brown fox jumps over a lazy dog while seven bright stars watch".split()
        for i in range(1000):
            flood.add_message("user", " ".join(rng.choice(words, 20))[:100], item_id=f"i{i}")
        live.add_text("Talk for a while.")
        made: list[float] = []
        started = threading.Event()

        def consume(resp):
            for ev in resp:
                if isinstance(ev, AudioChunk):
                    made.append(ev.made_at)
                    started.set()
                elif isinstance(ev, ResponseDone):
                    started.set()

        stream = live.respond()
        reader = threading.Thread(target=consume, args=(stream,))
        reader.start()
        assert started.wait(30)
        asked = time.perf_counter()
        reply = flood.respond(max_frames=2)   # answered once its prompt is fitted
        answered = time.perf_counter()
        done = reply.result()
        stream.cancel()
        reader.join()
    during = sum(1 for t in made if asked < t < answered)
    assert during >= 3, f"the live stream made {during} frames while the flood's prompt was prepared"
    assert done.stop_reason == "length" and done.usage.prompt_tokens <= 4096
    assert 1 < len(flood.history) < 1000 and flood.history[-2]["id"] == "i999"

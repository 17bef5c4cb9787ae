"""One conversation as the Reasoner reads it: pure data and arithmetic, no thread and no model.

The history is a list of messages (Qwen2.5-Omni style; an ``id`` names a client's item), each kept with its
audio parts and, once tokenized, its prompt ids. A message is tokenized once, on its own (``PromptBuilder``),
so a response's prompt is a concatenation, and a full context drops its oldest turns by arithmetic on the
per-message token counts. A response's prompt is prepared in bounded slices (``PromptPlan``), newest message
first: messages that will be forgotten are never tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..tokenizer import PromptBuilder, system_message, text_message
from .events import ContextFull, ConversationLimit, EngineError

#: Characters of message text tokenized per background slice (well under a millisecond of tokenizing).
TOKENIZE_SLICE_CHARS = 2048
#: What one message's rendering costs besides its text, in characters of tokenizing (the template's framing).
MESSAGE_COST_CHARS = 64


class AudioPart(Protocol):
    """A committed user audio part: its placeholder count is known at once, its embeddings come later."""

    tokens: int


@dataclass(eq=False)
class Entry:
    """One message of the history with its audio parts (in order) and its prompt ids once tokenized."""

    message: dict[str, Any]
    audio: list[AudioPart] = field(default_factory=list)
    ids: list[int] | None = None

    @property
    def chars(self) -> int:
        return 1 + sum(len(p.get("text", "")) for p in self.message["content"])

    def tokenize(self, builder: PromptBuilder, first: bool = False) -> list[int]:
        if self.ids is None:
            self.ids = builder.message_ids(self.message, [a.tokens for a in self.audio], first=first)
        return self.ids


class Conversation:
    """The history (``messages``, the first one the system's), the user's open turn, and what replies spoke.

    ``max_items``: the most messages after the system prompt; adding more raises ``ConversationLimit``."""

    def __init__(self, system_prompt: str | None = None, max_items: int | None = None):
        self.entries: list[Entry] = [Entry(system_message(system_prompt))]
        self.max_items = max_items
        self.spoken: dict[str, tuple[list[int], list[int]]] = {}   # a reply's tokens and their frames, by id
        self.open_parts: list[dict[str, Any]] = []    # the user's turn being received: text and audio parts
        self.open_audio: list[AudioPart] = []

    # ----- reading ---------------------------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, Any]]:
        return [e.message for e in self.entries]

    @property
    def audio(self) -> list[AudioPart]:
        """Every committed audio part, in order: the history's, then the open turn's."""
        return [a for e in self.entries for a in e.audio] + self.open_audio

    @property
    def items(self) -> int:
        """Messages after the system prompt."""
        return len(self.entries) - 1

    def index_of(self, index: int | str) -> int:
        """A message's position: ``index`` itself, or the position of the message whose id it is."""
        if isinstance(index, str):
            found = next((i for i, e in enumerate(self.entries) if e.message.get("id") == index), None)
            if found is None:
                raise EngineError(f"no message with id {index!r} in this conversation")
            return found
        return index

    def check_index(self, index: int, end: int) -> None:
        if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= end:
            raise EngineError(f"message index must be between 1 and {end} (0 is the system prompt), got {index!r}")

    def check_new_id(self, item_id: str | None) -> None:
        if item_id is not None and any(e.message.get("id") == item_id for e in self.entries):
            raise EngineError(f"the conversation already has a message with id {item_id!r}")

    def check_room(self) -> None:
        if self.max_items is not None and self.items >= self.max_items:
            raise ConversationLimit(f"the conversation already holds {self.items} items, the limit of this server "
                                    f"(max_conversation_items={self.max_items}): delete items before adding more")

    # ----- the user's open turn ----------------------------------------------------------------------------------
    def add_text_part(self, text: str) -> None:
        self.open_parts.append({"type": "text", "text": text})

    def add_audio_part(self, part: AudioPart | None) -> None:
        if part is not None:
            self.open_parts.append({"type": "audio"})
            self.open_audio.append(part)

    def close_turn(self, item_id: str | None = None) -> bool:
        """Make the open turn's parts one user message (named ``item_id``); False if nothing was pending."""
        self.check_new_id(item_id)
        if not self.open_parts:
            return False
        self.check_room()
        message: dict[str, Any] = {"role": "user", "content": self.open_parts}
        if item_id is not None:
            message["id"] = item_id
        self.entries.append(Entry(message, self.open_audio))
        self.open_parts, self.open_audio = [], []
        return True

    # ----- editing -----------------------------------------------------------------------------------------------
    def set_system(self, text: str) -> None:
        self.entries[0] = Entry(system_message(text))

    def add_message(self, role: str, text: str, item_id: str | None = None) -> None:
        """Append a text message. Without ``item_id`` it ends the open turn first; with one it stands alone and
        the open turn stays open."""
        self.check_new_id(item_id)
        if item_id is None:
            self.close_turn()
        self.check_room()
        self.entries.append(Entry(text_message(role, text, item_id)))

    def insert_message(self, index: int | str, role: str, text: str, item_id: str | None = None) -> None:
        """Put a text message at ``index`` (a string: right after the message with that id)."""
        self.check_new_id(item_id)
        index = self.index_of(index) + 1 if isinstance(index, str) else index
        self.check_index(index, len(self.entries))
        self.check_room()
        self.entries.insert(index, Entry(text_message(role, text, item_id)))

    def delete_message(self, index: int | str) -> None:
        """Remove a message (never the system prompt) and its audio."""
        index = self.index_of(index)
        self.check_index(index, len(self.entries) - 1)
        self.spoken.pop(self.entries[index].message.get("id"), None)
        del self.entries[index]

    def replace_text(self, index: int, text: str) -> dict[str, Any]:
        """Make message ``index`` an assistant message saying ``text`` (a truncated reply); returns it."""
        old = self.entries[index].message
        self.entries[index] = Entry(text_message("assistant", text, old.get("id")))
        return self.entries[index].message

    def add_reply(self, index: int, text: str, item_id: str | None,
                  spoken: tuple[list[int], list[int]]) -> dict[str, Any]:
        """A finished reply's message, at ``index`` (where its response began); returns it."""
        message = text_message("assistant", text, item_id)
        self.entries.insert(min(index, len(self.entries)), Entry(message))
        if item_id is not None:
            self.spoken[item_id] = spoken
        return message

    def forget(self, n: int) -> None:
        """Drop the ``n`` oldest messages after the system prompt, with their audio (a full context)."""
        for e in self.entries[1:1 + n]:
            self.spoken.pop(e.message.get("id"), None)
        del self.entries[1:1 + n]

    # ----- a response's prompt -------------------------------------------------------------------------------------
    def plan(self, system: str | None = None, messages: list[dict[str, str]] | None = None) -> PromptPlan:
        """The prompt of a response: the history (or ``messages`` instead, never forgotten), with the system
        prompt (or ``system`` for this response only)."""
        head = self.entries[0] if system is None else Entry(system_message(system))
        if messages is not None:
            return PromptPlan([head] + [Entry(text_message(m["role"], m["text"])) for m in messages], False)
        return PromptPlan([head] + self.entries[1:], True)


@dataclass(eq=False)
class PromptPlan:
    """A response's prompt in preparation: its messages (a snapshot of the history) tokenized in slices, newest
    first, until the rest would not fit; then ``fit`` picks the oldest message kept, by arithmetic.

    With ``forgettable``, a full context drops the oldest turns (the system prompt stays), as a person would: the
    kept messages start at a user message, or are the last message alone."""

    entries: list[Entry]
    forgettable: bool
    next: int = -2                # the entry to tokenize next, counting down from the newest; -1 when done
    tokens: int = 0               # tokens of the system and generation prompts and of entries[next + 1:]
    lowest: int = 1               # the oldest entry tokenized, once done
    generation_ids: list[int] = field(default_factory=list)

    def tokenize_slice(self, builder: PromptBuilder, budget: int, max_items: int | None,
                       chars: int = TOKENIZE_SLICE_CHARS) -> bool:
        """Tokenize the next messages (newest first) worth about ``chars`` characters, in one call; True when
        every message that could fit ``budget`` tokens (generation prompt included) is tokenized."""
        if self.next == -2:
            self.generation_ids = builder.generation_ids
            self.tokens = len(self.entries[0].tokenize(builder, first=True)) + len(self.generation_ids)
            self.next = len(self.entries) - 1
        # Older messages than this cannot be kept for the item limit, whatever their size.
        lowest = max(1, len(self.entries) - _keepable(max_items)) if self.forgettable else 1
        batch: list[Entry] = []
        size, i, known = 0, self.next, self.tokens
        while i >= lowest and size < chars:
            entry = self.entries[i]
            if entry.ids is None:
                batch.append(entry)
                size += entry.chars + MESSAGE_COST_CHARS
            elif not batch:
                known += len(entry.ids)
            size += 1
            i -= 1
            if self.forgettable and known > budget:
                break   # the newer messages fill the budget already: tokenize nothing older
        if batch:
            batch.reverse()
            ids = builder.messages_ids([e.message for e in batch], [[a.tokens for a in e.audio] for e in batch])
            for entry, message_ids in zip(batch, ids, strict=True):
                entry.ids = message_ids
        while self.next > i:
            if self.forgettable and self.tokens > budget and self.next < len(self.entries) - 1:
                break   # what is counted already overflows: every older message will be forgotten
            self.tokens += len(self.entries[self.next].ids)
            self.next -= 1
        finished = self.next < lowest or (self.forgettable and self.tokens > budget)
        if finished:
            self.lowest = self.next + 1
        return finished

    def fit(self, budget: int, max_items: int | None, context: int) -> int:
        """The first message kept (>= 1) so that the prompt fits ``budget`` tokens and the item limit; raises
        ``ContextFull`` when even the last message alone does not fit."""
        n = len(self.entries)
        lowest = self.lowest
        suffix = [0] * (n + 1)
        for i in range(n - 1, lowest - 1, -1):
            suffix[i] = suffix[i + 1] + len(self.entries[i].ids)
        head = self.tokens - suffix[lowest]   # the system prompt and the generation prompt
        keep = _keepable(max_items) if self.forgettable else n
        start = 1
        while True:
            if start >= lowest and head + suffix[start] <= budget and n - start <= keep:
                return start
            if not self.forgettable or n - start < 2:
                break
            start = next((i for i in range(start + 1, n) if self.entries[i].message["role"] == "user"), n - 1)
        size = head + suffix[max(start, lowest)]
        raise ContextFull(f"this turn ({size} tokens with the instructions) leaves no room to answer within the "
                          f"{context}-token context")

    def ids(self, start: int) -> tuple[list[int], list[AudioPart]]:
        """The prompt's ids (system, messages from ``start``, generation prompt) and its audio parts in order."""
        ids = list(self.entries[0].ids)
        audio: list[AudioPart] = []
        for e in self.entries[start:]:
            ids += e.ids
            audio += e.audio
        return ids + self.generation_ids, audio


def _keepable(max_items: int | None) -> int:
    """Messages a response may keep: room for its reply and one more user item under the item limit."""
    return 1 << 62 if max_items is None else max(1, max_items - 2)

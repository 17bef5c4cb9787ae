"""The Reasoner's text side: its tokenizer, loaded with ``transformers``, and Chroma's prompt building.

``ChatTokenizer.from_dir`` loads a checkpoint directory's tokenizer (``tokenizer.json``, or Qwen2's
``vocab.json`` + ``merges.txt``) and chat template with ``transformers``; ``build_chat_prompt`` turns
Qwen2.5-Omni style messages into Reasoner input ids with every audio part expanded to its ``<|AUDIO|>``
placeholders, the ids the Qwen2.5-Omni processor produces; ``IncrementalDecoder`` streams text out of token
ids with ``tokenizers``' ``DecodeStream``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream

__all__ = [
    "AUDIO_BOS_ID",
    "AUDIO_EOS_ID",
    "AUDIO_TOKEN_ID",
    "ENDOFTEXT_ID",
    "IM_END_ID",
    "IM_START_ID",
    "QWEN_OMNI_SYSTEM_PROMPT",
    "TEXT_END_ID",
    "TEXT_START_ID",
    "ChatTokenizer",
    "IncrementalDecoder",
    "PromptBuilder",
    "TokenizerNotFoundError",
    "build_chat_prompt",
    "system_message",
    "text_message",
]

# Ids of the Qwen2.5-Omni special tokens Chroma's prompts use (the Reasoner's embedding rows).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
AUDIO_TOKEN_ID = 151646
AUDIO_BOS_ID = 151647
AUDIO_EOS_ID = 151648
# Chroma's prompt-text delimiters (``text_start_token_id`` / ``text_end_token_id``). The released Qwen2.5-Omni
# tokenizer has no tokens at these ids (its last one is 151664): Chroma uses the embedding rows directly.
TEXT_START_ID = 151665
TEXT_END_ID = 151666
# The tokens prompt building writes, at the ids the Reasoner was trained with.
_PROMPT_TOKENS = {
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
    "<|AUDIO|>": AUDIO_TOKEN_ID,
    "<|audio_bos|>": AUDIO_BOS_ID,
    "<|audio_eos|>": AUDIO_EOS_ID,
}

#: The system prompt Qwen2.5-Omni expects for spoken conversations.
QWEN_OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)


class TokenizerNotFoundError(FileNotFoundError):
    """A checkpoint directory without a usable tokenizer."""


class ChatTokenizer:
    """The Reasoner's tokenizer: a ``transformers`` fast tokenizer (``.hf``) and the calls Chroma makes."""

    def __init__(self, hf: Any, name: str = "<in-memory tokenizer>"):
        self.hf = hf
        self.name = name
        self.special_ids: frozenset[int] = frozenset(i for i, t in hf.added_tokens_decoder.items() if t.special)

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTokenizer:
        """Load a checkpoint directory's tokenizer and chat template with ``transformers``.

        ``tokenizer.json`` loads as a ``PreTrainedTokenizerFast`` whatever ``tokenizer_class`` says; without it,
        ``vocab.json`` + ``merges.txt`` load as Qwen2's tokenizer (the Reasoner's). The chat template comes from
        ``chat_template.jinja`` or ``tokenizer_config.json``, else from ``chat_template.json`` (where
        Qwen2.5-Omni's processor keeps it).
        """
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerNotFoundError(f"tokenizer directory {directory} does not exist or is not a directory")
        import transformers  # imported late: loading it takes about a second

        if (directory / "tokenizer.json").is_file():
            loader = transformers.PreTrainedTokenizerFast
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            loader = transformers.Qwen2Tokenizer
        else:
            raise TokenizerNotFoundError(
                f"no tokenizer in {directory}: missing tokenizer.json (or vocab.json + merges.txt)"
            )
        try:
            hf = loader.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # tokenizers raises plain Exceptions on malformed files
            raise ValueError(f"{directory}: cannot load the tokenizer: {exc}") from exc
        if hf.chat_template is None and (directory / "chat_template.json").is_file():
            template = json.loads((directory / "chat_template.json").read_text(encoding="utf-8"))
            hf.chat_template = template.get("chat_template") if isinstance(template, dict) else None
        wrong = {t: hf.convert_tokens_to_ids(t) for t, i in _PROMPT_TOKENS.items() if hf.convert_tokens_to_ids(t) != i}
        if wrong:
            raise ValueError(
                f"{directory}: the tokenizer's special tokens are not at the Qwen2.5-Omni ids the model uses "
                f"({', '.join(f'{t} is {i}, expected {_PROMPT_TOKENS[t]}' for t, i in wrong.items())})"
            )
        return cls(hf, name=str(directory))

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``eos_token`` (``<|im_end|>`` for Qwen2.5-Omni), if configured."""
        return self.hf.eos_token_id

    def token_to_id(self, token: str) -> int:
        """Id of ``token``; ``KeyError`` naming the tokenizer if it has no such token."""
        token_id = self.hf.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.hf.unk_token_id or self.hf.convert_ids_to_tokens(token_id) != token:
            raise KeyError(f"token {token!r} is not in the tokenizer {self.name}")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added; special-token strings become their ids)."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        sanitize_control_tokens: bool = False,
    ) -> list[int]:
        """Token ids of the rendered chat (``transformers``' ``apply_chat_template``)."""
        if self.hf.chat_template is None:
            raise ValueError(f"the tokenizer {self.name} has no chat template")
        return self.hf.apply_chat_template(
            list(messages),
            add_generation_prompt=add_generation_prompt,
            sanitize_control_tokens=sanitize_control_tokens,
            tokenize=True,
            return_dict=False,
        )

    def incremental_decoder(self, *, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh streaming detokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turn token ids arriving one at a time into text deltas (``tokenizers``' ``DecodeStream``).

    Text is emitted once final: an incomplete UTF-8 sequence split across byte-level tokens is held back.
    ``flush`` returns whatever is still held back at the end of a stream.
    """

    def __init__(self, tokenizer: ChatTokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._held: list[int] = []  # ids pushed since the last emitted text
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    @property
    def token_ids(self) -> list[int]:
        """All ids pushed so far."""
        return list(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly final text (possibly empty)."""
        self._ids.append(int(token_id))
        self._held.append(int(token_id))
        delta = self._stream.step(self._tokenizer.hf.backend_tokenizer, int(token_id))
        if delta is None:
            return ""
        self._held.clear()
        self._parts.append(delta)
        return delta

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Add several ids; return the concatenated new text."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Emit whatever is held back (incomplete UTF-8 becomes U+FFFD) and start a fresh stream."""
        # What was emitted ends on a complete character, so the held ids decode on their own.
        delta = self._tokenizer.decode(self._held, skip_special_tokens=self._skip) if self._held else ""
        self._held.clear()
        self._stream = DecodeStream(skip_special_tokens=self._skip)
        if delta:
            self._parts.append(delta)
        return delta


# ----------------------------------------------------------------------------------------------------------
# Prompt building
# ----------------------------------------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")


def text_message(role: str, text: str, item_id: str | None = None) -> dict[str, Any]:
    """A Qwen2.5-Omni text message; ``id`` (when given) is a client's name for it (realtime conversation items)."""
    message: dict[str, Any] = {"role": role, "content": [{"type": "text", "text": text}]}
    if item_id is not None:
        message["id"] = item_id
    return message


def system_message(text: str | None = None) -> dict[str, Any]:
    """The system message a conversation starts with; ``None``: Qwen2.5-Omni's speech prompt (the one the
    Reasoner was trained to speak under). Training and serving build it here, so both send the same text."""
    return text_message("system", QWEN_OMNI_SYSTEM_PROMPT if text is None else text)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> int:
    """Validate Qwen2.5-Omni style messages; return the number of audio parts."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    n_audio = 0
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if role not in _ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(_ROLES)}")
        if isinstance(content, str):
            continue
        if not isinstance(content, Sequence):
            raise ValueError(
                f"message {index} content must be a string or a list of parts, got {type(content)}"
            )
        for part_index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "audio":
                n_audio += 1
            elif kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {index} part {part_index}: a text part needs a string 'text'")
            else:
                raise ValueError(
                    f"message {index} part {part_index}: expected {{'type': 'text', 'text': ...}} or "
                    f"{{'type': 'audio'}}, got {part!r}"
                )
    return n_audio


def build_chat_prompt(
    tokenizer: ChatTokenizer,
    messages: Sequence[Mapping[str, Any]],
    audio_token_counts: Sequence[int] = (),
    *,
    default_system_prompt: str | None = QWEN_OMNI_SYSTEM_PROMPT,
    add_generation_prompt: bool = True,
    sanitize_control_tokens: bool = False,
) -> list[int]:
    """Reasoner input ids for ``messages`` with each audio part expanded to its placeholders.

    Messages follow Qwen2.5-Omni: ``{"role": "system"|"user"|"assistant", "content": str | [parts]}``
    with parts ``{"type": "text", "text": ...}`` and ``{"type": "audio", ...}``. The i-th audio part becomes
    ``<|audio_bos|>`` + ``<|AUDIO|>`` x ``audio_token_counts[i]`` + ``<|audio_eos|>``, exactly as the
    Qwen2.5-Omni processor expands the chat template's output. If the conversation does not start with a
    system message, ``default_system_prompt`` (the Qwen2.5-Omni speech prompt) is put first; with ``None``
    the template's own default ("You are a helpful assistant.") applies. With ``add_generation_prompt`` the
    ids end with ``<|im_start|>assistant\\n``.
    """
    n_audio = _check_messages(messages)
    counts = [int(c) for c in audio_token_counts]
    if len(counts) != n_audio:
        raise ValueError(f"the messages have {n_audio} audio part(s) but {len(counts)} audio token count(s)")
    for i, count in enumerate(counts):
        if count < 0:
            raise ValueError(f"audio token count {i} must not be negative, got {count}")
    chat = list(messages)
    if default_system_prompt is not None and chat[0]["role"] != "system":
        chat.insert(0, {"role": "system", "content": default_system_prompt})

    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=add_generation_prompt, sanitize_control_tokens=sanitize_control_tokens
    )
    audio_id = tokenizer.token_to_id("<|AUDIO|>")
    bos_id = tokenizer.token_to_id("<|audio_bos|>")
    eos_id = tokenizer.token_to_id("<|audio_eos|>")
    positions = [i for i, t in enumerate(ids) if t == audio_id]
    if len(positions) != n_audio:
        raise ValueError(
            f"the rendered prompt has {len(positions)} <|AUDIO|> token(s) for {n_audio} audio part(s); a "
            "text part probably contains the literal '<|AUDIO|>' (use sanitize_control_tokens=True to encode "
            "it as text)"
        )
    out: list[int] = []
    start = 0
    for pos, count in zip(positions, counts, strict=True):
        if pos == 0 or ids[pos - 1] != bos_id or pos + 1 >= len(ids) or ids[pos + 1] != eos_id:
            raise ValueError(
                "the chat template must render each audio part as <|audio_bos|><|AUDIO|><|audio_eos|>"
            )
        out += ids[start:pos]
        out += [audio_id] * count
        start = pos + 1
    out += ids[start:]
    return out


class PromptBuilder:
    """Reasoner input ids built message by message: each message is tokenized once, on its own, and a prompt is
    the concatenation of its messages' ids and the generation prompt.

    The ids equal ``build_chat_prompt``'s for the whole conversation: the Qwen2.5-Omni template renders every
    message on its own between ``<|im_start|>`` and ``<|im_end|>``, and the tokenizer never merges across
    special tokens (checked here once, on a sample conversation). So a conversation's prompt costs one
    tokenization per new message, not one per message per response.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self._anchor = [system_message("-")]
        self._anchor_ids = tokenizer.apply_chat_template(self._anchor, add_generation_prompt=False)
        with_prompt = tokenizer.apply_chat_template(self._anchor, add_generation_prompt=True)
        if with_prompt[: len(self._anchor_ids)] != self._anchor_ids:
            raise ValueError(f"the chat template of {tokenizer.name} does not render messages one by one")
        self.generation_ids: list[int] = with_prompt[len(self._anchor_ids):]
        sample = [system_message("Be brief."), {"role": "user", "content": [{"type": "audio"}, {"type": "text",
                                                                                              "text": "Hi"}]},
                  text_message("assistant", "Hello there."), text_message("user", "And now?")]
        if self.build(sample, [3]) != build_chat_prompt(tokenizer, sample, [3]):
            raise ValueError(f"the chat template of {tokenizer.name} does not render messages one by one")

    def message_ids(self, message: Mapping[str, Any], audio_token_counts: Sequence[int] = (),
                    first: bool = False) -> list[int]:
        """Ids of ``message`` as it renders inside a conversation (``first``: as its first message), each audio
        part expanded to its ``audio_token_counts`` placeholders."""
        if first:
            return build_chat_prompt(self.tokenizer, [message], audio_token_counts, add_generation_prompt=False)
        ids = build_chat_prompt(self.tokenizer, [*self._anchor, message], audio_token_counts,
                                add_generation_prompt=False)
        if ids[: len(self._anchor_ids)] != self._anchor_ids:
            raise ValueError("the chat template renders a message differently after another one")
        return ids[len(self._anchor_ids):]

    def messages_ids(self, messages: Sequence[Mapping[str, Any]],
                     audio_token_counts: Sequence[Sequence[int]]) -> list[list[int]]:
        """``message_ids`` of several messages (none of them first), rendered and tokenized in one call: the
        template's per-call cost is paid once, and the ids are cut at each message's ``<|im_start|>``."""
        if len(messages) < 2:
            return [self.message_ids(m, c) for m, c in zip(messages, audio_token_counts, strict=True)]
        flat = [n for counts in audio_token_counts for n in counts]
        ids = build_chat_prompt(self.tokenizer, [*self._anchor, *messages], flat, add_generation_prompt=False)
        rest = ids[len(self._anchor_ids):]
        starts = [i for i, t in enumerate(rest) if t == IM_START_ID]
        if ids[: len(self._anchor_ids)] != self._anchor_ids or len(starts) != len(messages) or starts[0] != 0:
            # A text holding a literal "<|im_start|>" (a special token here): cut message by message instead.
            return [self.message_ids(m, c) for m, c in zip(messages, audio_token_counts, strict=True)]
        return [rest[a:b] for a, b in zip(starts, [*starts[1:], len(rest)], strict=True)]

    def build(self, messages: Sequence[Mapping[str, Any]], audio_token_counts: Sequence[int] = ()) -> list[int]:
        """``build_chat_prompt(messages, audio_token_counts)`` (the first message must be the system's)."""
        counts = list(audio_token_counts)
        ids: list[int] = []
        for i, m in enumerate(messages):
            n = 0 if isinstance(m["content"], str) else sum(1 for p in m["content"] if p.get("type") == "audio")
            ids += self.message_ids(m, counts[:n], first=i == 0)
            counts = counts[n:]
        if counts:
            raise ValueError(f"{len(counts)} audio token count(s) left over: more counts than audio parts")
        return ids + self.generation_ids

"""Text tokenizer and chat prompt building for the Qwen2.5-Omni thinker.

``ChatTokenizer`` wraps a ``tokenizers.Tokenizer`` loaded from a checkpoint directory and renders its
chat template the way ``transformers``' ``apply_chat_template`` does. ``build_chat_prompt`` turns
Qwen2.5-Omni style messages into thinker input ids with every audio part expanded to its ``<|AUDIO|>``
placeholders, the same ids the Qwen2.5-Omni processor produces. ``write_test_tokenizer`` writes a small real
tokenizer whose special tokens sit at the published Qwen2.5-Omni (and Chroma) ids, for random-weight test
checkpoints.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .models.audio_encoder import audio_token_count  # noqa: F401  (re-exported: prompt building uses it)

__all__ = [
    "AUDIO_BOS_ID",
    "AUDIO_EOS_ID",
    "AUDIO_TOKEN_ID",
    "CHROMA_ADDED_TOKENS",
    "ENDOFTEXT_ID",
    "IM_END_ID",
    "IM_START_ID",
    "QWEN_OMNI_ADDED_TOKENS",
    "QWEN_OMNI_CHAT_TEMPLATE",
    "QWEN_OMNI_SYSTEM_PROMPT",
    "TEXT_END_ID",
    "TEXT_START_ID",
    "ChatTokenizer",
    "IncrementalDecoder",
    "TokenizerNotFoundError",
    "audio_token_count",
    "build_chat_prompt",
    "write_test_tokenizer",
]

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
AUDIO_TOKEN_ID = 151646
AUDIO_BOS_ID = 151647
AUDIO_EOS_ID = 151648
TEXT_START_ID = 151665
TEXT_END_ID = 151666

#: Added tokens of the Qwen2.5-Omni tokenizer (``added_tokens_decoder`` of Qwen/Qwen2.5-Omni-3B).
QWEN_OMNI_ADDED_TOKENS: dict[int, str] = {
    151643: "<|endoftext|>",
    151644: "<|im_start|>",
    151645: "<|im_end|>",
    151646: "<|AUDIO|>",
    151647: "<|audio_bos|>",
    151648: "<|audio_eos|>",
    151649: "<|box_end|>",
    151650: "<|quad_start|>",
    151651: "<|quad_end|>",
    151652: "<|vision_bos|>",
    151653: "<|vision_eos|>",
    151654: "<|vision_pad|>",
    151655: "<|IMAGE|>",
    151656: "<|VIDEO|>",
    151657: "<tool_call>",
    151658: "</tool_call>",
    151659: "<|fim_prefix|>",
    151660: "<|fim_middle|>",
    151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>",
    151663: "<|repo_name|>",
    151664: "<|file_sep|>",
}
#: Chroma's prompt-text delimiters (``text_start_token_id`` / ``text_end_token_id``). The released
#: Qwen2.5-Omni tokenizer has no tokens at these ids (its last one is 151664): Chroma uses the embedding rows
#: directly.
#: The test tokenizer names them so that they can be written and read back.
CHROMA_ADDED_TOKENS: dict[int, str] = {TEXT_START_ID: "<|text_start|>", TEXT_END_ID: "<|text_end|>"}

#: The system prompt Qwen2.5-Omni expects for spoken conversations.
QWEN_OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)

#: The Qwen2.5-Omni chat template (``chat_template.json`` of Qwen/Qwen2.5-Omni-3B).
QWEN_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Qwen2 pre-tokenizer split (``transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX``).
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_MARK_START, _MARK_END = "\ue000", "\ue001"  # private-use markers around user-supplied control tokens


class TokenizerNotFoundError(FileNotFoundError):
    """A checkpoint directory without a usable tokenizer."""


# ----------------------------------------------------------------------------------------------------------
# Chat template rendering (the transformers recipe: sandboxed jinja2, trim_blocks, lstrip_blocks)
# ----------------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` blocks (assistant masks) and render their body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types; anything else becomes an inert ``<TypeName>`` string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # numpy / torch scalars
    return f"<{type(value).__name__}>"


def _mark(value: Any, pattern: re.Pattern[str]) -> Any:
    """Wrap control tokens inside user strings with private-use markers (dict keys are left alone)."""
    if isinstance(value, str):
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")
        return pattern.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", value)
    if isinstance(value, dict):
        return {k: _mark(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, pattern) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------
# ChatTokenizer
# ----------------------------------------------------------------------------------------------------------


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` plus its chat template and special tokens."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        config: Mapping[str, Any] | None = None,
        name: str = "<in-memory tokenizer>",
    ):
        self._tok = tokenizer
        self._config = dict(config or {})
        self._chat_template = chat_template
        self.name = name
        self._added = {int(i): t for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._special_ids = frozenset(i for i, t in self._added.items() if t.special)
        self._plain_tok: Tokenizer | None = None

    # -- loading ------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTokenizer:
        """Load a checkpoint directory's tokenizer.

        Reads ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``), ``tokenizer_config.json`` and the chat
        template (``chat_template.jinja``, else ``tokenizer_config.json["chat_template"]``, else
        ``chat_template.json``).
        """
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerNotFoundError(
                f"tokenizer directory {directory} does not exist or is not a directory"
            )
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            config = _read_json(config_path)

        tok_path = directory / "tokenizer.json"
        if tok_path.is_file():
            try:
                tokenizer = Tokenizer.from_file(str(tok_path))
            except Exception as exc:  # tokenizers raises a plain Exception on malformed files
                raise ValueError(f"{tok_path}: cannot load tokenizer: {exc}") from exc
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            tokenizer = _qwen2_from_vocab_merges(directory / "vocab.json", directory / "merges.txt", config)
        else:
            raise TokenizerNotFoundError(
                f"no tokenizer in {directory}: missing tokenizer.json (or vocab.json + merges.txt)"
            )
        return cls(
            tokenizer,
            chat_template=_find_chat_template(directory, config),
            config=config,
            name=str(directory),
        )

    # -- basic properties ---------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def config(self) -> dict[str, Any]:
        """The parsed ``tokenizer_config.json`` (empty if there was none)."""
        return self._config

    @property
    def chat_template(self) -> str | None:
        """The chat template source, if the checkpoint has one."""
        return self._chat_template

    @functools.cached_property
    def vocab_size(self) -> int:
        """One past the largest token id (model vocabulary and added tokens; ids may have gaps)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """``bos_token``/``eos_token``/... from ``tokenizer_config.json`` (those that are set)."""
        out: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = self._config.get(key)
            if isinstance(value, Mapping):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
        extra = self._config.get("extra_special_tokens")
        if isinstance(extra, Mapping):  # named extras such as audio_token (transformers exposes these too)
            out.update({k: v for k, v in extra.items() if isinstance(k, str) and isinstance(v, str)})
        return out

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``eos_token`` (``<|im_end|>`` for Qwen2.5-Omni), if configured."""
        eos = self.special_tokens_map.get("eos_token")
        return None if eos is None else self._tok.token_to_id(eos)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special added tokens."""
        return self._special_ids

    def token_to_id(self, token: str) -> int:
        """Id of ``token``; ``KeyError`` naming the tokenizer if it has no such token."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer {self.name}")
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of ``token_id`` (``None`` if unknown)."""
        return self._tok.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special added token."""
        return int(token_id) in self._special_ids

    # -- encoding / decoding ------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added). With ``allow_special=False`` special-token strings inside
        ``text`` are encoded as plain text instead of their ids."""
        tok = self._tok if allow_special else self._plain()
        return list(tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, *, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh streaming detokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def _plain(self) -> Tokenizer:
        if self._plain_tok is None:
            plain = Tokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain_tok = plain
        return self._plain_tok

    # -- chat template ------------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` with the chat template, as ``apply_chat_template(..., tokenize=False)``."""
        template = chat_template if chat_template is not None else self._chat_template
        if template is None:
            raise ValueError(f"the tokenizer {self.name} has no chat template")
        if not messages:
            raise ValueError("cannot render an empty conversation: give at least one message")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TypeError(f"chat messages must be dicts, got {message!r}")
            chat.append({k: v for k, v in message.items() if v is not None})
        kwargs = {**self.special_tokens_map, **template_kwargs}
        return _compile_template(template).render(
            messages=_plain(chat),
            tools=_plain(kwargs.pop("tools", None)),
            documents=_plain(kwargs.pop("documents", None)),
            add_generation_prompt=add_generation_prompt,
            **_plain(kwargs),
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        sanitize_control_tokens: bool = False,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat, as ``transformers``' ``apply_chat_template(..., tokenize=True)``.

        With ``sanitize_control_tokens`` special tokens written inside message strings are encoded as plain
        text, so user text cannot forge ``<|im_end|>`` and the like (transformers' option of the same name).
        """
        if not sanitize_control_tokens:
            text = self.render_chat(
                messages,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                **template_kwargs,
            )
            return self.encode(text)
        template = chat_template if chat_template is not None else (self._chat_template or "")
        controls = sorted(self._control_tokens(template), key=len, reverse=True)
        control_re = re.compile("|".join(map(re.escape, controls)) or "(?!)")
        marked = [_mark(dict(m), control_re) for m in messages]
        text = self.render_chat(
            marked,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            **_mark(template_kwargs, control_re),
        )
        return self._encode_marked(text, control_re)

    def _control_tokens(self, template: str) -> list[str]:
        return [
            t.content
            for t in self._added.values()
            if t.special or (t.content in template and not t.content.isspace())
        ]

    def _encode_marked(self, text: str, control_re: re.Pattern[str]) -> list[int]:
        markers = re.compile(f"{_MARK_START}({control_re.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
        pieces = markers.split(text)  # [text, marked token or None, text, ...]
        newline = self.encode("\n")
        ids = self.encode(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            piece_ids = self.encode("\n" + piece, allow_special=not as_text)
            if piece_ids[: len(newline)] == newline:
                piece_ids = piece_ids[len(newline) :]
            else:
                piece_ids = self.encode(piece, allow_special=not as_text)
            ids += piece_ids
        return ids


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _find_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str):
        return template
    json_path = directory / "chat_template.json"
    if json_path.is_file():
        template = _read_json(json_path).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def _qwen2_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> models.BPE:
    return models.BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )


def _added_token_json(token_id: int, content: str, special: bool = True) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _with_added_tokens(tokenizer_json: dict[str, Any], added: Mapping[int, tuple[str, bool]]) -> Tokenizer:
    """Place ``added`` tokens at their exact ids.

    ``tokenizers`` keeps the id of an added token that is also in the model vocabulary (a BPE vocabulary may
    have gaps) but renumbers the others, so the tokens go into both.
    """
    vocab = tokenizer_json["model"]["vocab"]
    taken = {i: t for t, i in vocab.items()}
    for token_id, (content, _) in added.items():
        if taken.get(token_id, content) != content:
            raise ValueError(f"id {token_id} of added token {content!r} is taken by {taken[token_id]!r}")
        vocab[content] = token_id
    tokenizer_json["added_tokens"] = [
        _added_token_json(i, content, special) for i, (content, special) in sorted(added.items())
    ]
    return Tokenizer.from_str(json.dumps(tokenizer_json, ensure_ascii=False))


def _qwen2_from_vocab_merges(vocab_path: Path, merges_path: Path, config: Mapping[str, Any]) -> Tokenizer:
    vocab = _read_json(vocab_path)
    merges = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        left, _, right = line.partition(" ")
        merges.append((left, right))
    tokenizer = _qwen2_pipeline(Tokenizer(_bpe({k: int(v) for k, v in vocab.items()}, merges)))
    added: dict[int, tuple[str, bool]] = {}
    for key, value in (config.get("added_tokens_decoder") or {}).items():
        content = value.get("content") if isinstance(value, Mapping) else str(value)
        special = bool(value.get("special", True)) if isinstance(value, Mapping) else True
        added[int(key)] = (content, special)
    if not added:
        return tokenizer
    return _with_added_tokens(json.loads(tokenizer.to_str()), added)


# ----------------------------------------------------------------------------------------------------------
# Streaming detokenization
# ----------------------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turn token ids arriving one at a time into text deltas.

    Decodes a small window of recent ids and emits only text that is final: while the window's text ends with
    U+FFFD (an incomplete UTF-8 sequence split across byte-level tokens) it is held back. ``flush`` returns
    whatever is still held back at the end of a stream.
    """

    def __init__(self, tokenizer: ChatTokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window (context for the decoder)
        self._read = 0  # ids before this have been emitted
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
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if (
            len(full_text) > len(prefix_text)
            and not full_text.endswith("\ufffd")
            and full_text.startswith(prefix_text)
        ):
            delta = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._parts.append(delta)
            return delta
        return ""

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Add several ids; return the concatenated new text."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Emit whatever is held back (incomplete UTF-8 becomes U+FFFD) and start a fresh window."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        common = 0  # normally all of prefix_text; be robust to decoders that rewrite earlier text
        while common < min(len(prefix_text), len(full_text)) and prefix_text[common] == full_text[common]:
            common += 1
        delta = full_text[common:]
        self._prefix = self._read = len(self._ids)
        if delta:
            self._parts.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""


# ----------------------------------------------------------------------------------------------------------
# Prompt building
# ----------------------------------------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")


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
    """Thinker input ids for ``messages`` with each audio part expanded to its placeholders.

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


# ----------------------------------------------------------------------------------------------------------
# Test tokenizer
# ----------------------------------------------------------------------------------------------------------

_TRAINING_TEXT = """\
Hello! How are you doing today? I am doing well, thank you for asking.
This is a small conversation between a person and a voice assistant that can listen and speak.
The assistant hears what the user says, thinks about it, and then answers with a natural voice.
Can you tell me what the weather will be like tomorrow morning? It should be sunny and warm.
Please speak a little more slowly, and use a calm and friendly tone of voice.
What time is it right now? It is a quarter past three in the afternoon.
I would like to book a table for two people at seven o'clock this evening.
Of course. I have reserved a table for two at seven. Is there anything else I can help with?
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
We are testing the streaming speech pipeline: audio comes in, text and speech come out.
Numbers like 1, 2, 3, 42, 100 and 2025 are written with digits; words like one and two are not.
She said, "That's wonderful news!" and we all laughed together for a long while.
They've been working on the new model for months, and it's finally ready to be tested.
Let's talk about music, books, movies, travel, food, and the things that make people happy.
The sound of the ocean at night is quiet, deep, and steady, like a slow breathing rhythm.
Could you repeat that, please? I didn't quite catch the last part of what you said.
Thank you very much for your help today. You're welcome, have a nice day and talk to you soon!
In the beginning there was only silence, and then a voice started to speak about the world.
Every morning the small town wakes up early, the bakery opens, and the streets fill with people.
Good morning, good afternoon, good evening, and good night to everyone who is listening.
The children were playing in the garden while their parents were talking about the holidays.
A good story has a beginning, a middle and an ending, and the best ones are told out loud.
When the train arrived at the station, the passengers were waiting with their bags and coats.
Listening carefully is the most important thing in a conversation; speaking comes second.
Remember to drink water, take a short walk, and rest your eyes after working for a long time.
The recording was clear, the speaker was confident, and the questions were answered quickly.
How many minutes does it take to walk from the station to the museum? About fifteen minutes.
Would you like some coffee or tea? I would love a cup of tea with a little milk, thank you.
"""


def _train_test_bpe(vocab_size: int) -> dict[str, Any]:
    tokenizer = _qwen2_pipeline(Tokenizer(_bpe({}, [])))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = _TRAINING_TEXT.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return json.loads(tokenizer.to_str())


def write_test_tokenizer(out_dir: str | Path, *, vocab_size: int = 768) -> Path:
    """Write a small byte-level BPE tokenizer with Qwen2.5-Omni's special tokens at their published ids.

    The 256 byte tokens and up to ``vocab_size - 256`` merges are learned (deterministically) from a built-in
    English text; the 22 Qwen2.5-Omni added tokens sit at 151643-151664 and Chroma's ``<|text_start|>`` /
    ``<|text_end|>`` at 151665/151666. Writes ``tokenizer.json`` and ``tokenizer_config.json`` (with the
    Qwen2.5-Omni chat template) so that ``ChatTokenizer.from_dir`` and ``transformers.AutoTokenizer`` load it
    with the same ids. Returns the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _train_test_bpe(vocab_size)
    added = {i: (t, True) for i, t in {**QWEN_OMNI_ADDED_TOKENS, **CHROMA_ADDED_TOKENS}.items()}
    tokenizer = _with_added_tokens(tokenizer_json, added)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=False), encoding="utf-8")

    def tok(token_id: int) -> str:
        return QWEN_OMNI_ADDED_TOKENS[token_id]

    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token_json(i, content, special).items() if k != "id"}
            for i, (content, special) in sorted(added.items())
        },
        "additional_special_tokens": [
            tok(i)
            for i in (
                151644,
                151645,
                151646,
                151647,
                151648,
                151649,
                151650,
                151651,
                151652,
                151653,
                151654,
                151655,
                151656,
            )
        ],
        "extra_special_tokens": {
            "image_token": tok(151655),
            "audio_token": tok(151646),
            "video_token": tok(151656),
            "vision_bos_token": tok(151652),
            "vision_eos_token": tok(151653),
            "audio_bos_token": tok(151647),
            "audio_eos_token": tok(151648),
        },
        "bos_token": None,
        "chat_template": QWEN_OMNI_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out

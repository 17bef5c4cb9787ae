"""Typed views of a Chroma checkpoint's ``config.json``.

Every size, rope setting and special token comes from the file; nothing is hard-coded, because the
tiny reference checkpoint and the published 4B one share the structure at different sizes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import CODEC_SAMPLE_RATE, FRAME_RATE_HZ, FRAME_SAMPLES

_log = logging.getLogger("openchroma")


class ConfigError(ValueError):
    """The config is missing, unreadable or not a Chroma config."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> RopeConfig:
        params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"{where}: unsupported rope_type {rope_type!r} (supported: default, llama3)")
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class TransformerConfig:
    """A Llama / Qwen2 style decoder stack."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    vocab_size: int
    qkv_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str, qkv_bias: bool | None = None) -> TransformerConfig:
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            return cls(
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads", heads)),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_dict(d, where),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                vocab_size=int(d.get("vocab_size", 0)),
                qkv_bias=bool(d.get("attention_bias", False)) if qkv_bias is None else qkv_bias,
            )
        except KeyError as e:
            raise ConfigError(f"{where}: missing key {e.args[0]!r}") from None


@dataclass(frozen=True)
class AudioEncoderConfig:
    """The Qwen2.5-Omni (Whisper-style) audio encoder."""

    d_model: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    num_mel_bins: int
    output_dim: int
    n_window: int
    max_source_positions: int
    activation: str = "gelu"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> AudioEncoderConfig:
        try:
            return cls(
                d_model=int(d["d_model"]),
                num_layers=int(d.get("encoder_layers", d.get("num_hidden_layers"))),
                num_heads=int(d["encoder_attention_heads"]),
                ffn_dim=int(d["encoder_ffn_dim"]),
                num_mel_bins=int(d.get("num_mel_bins", 128)),
                output_dim=int(d["output_dim"]),
                n_window=int(d["n_window"]),
                max_source_positions=int(d.get("max_source_positions", 1500)),
                activation=str(d.get("activation_function", "gelu")),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: missing or bad key {e}") from None


@dataclass(frozen=True)
class ChromaConfig:
    reasoner: TransformerConfig    # the published config's thinker_config.text_config
    audio_encoder: AudioEncoderConfig
    backbone: TransformerConfig
    decoder: TransformerConfig
    codec: dict[str, Any]
    audio_num_codebooks: int = 8
    codebook_eos_token_id: int = 0
    codebook_pad_token_id: int = 2050
    text_start_token_id: int = 151665
    text_end_token_id: int = 151666
    im_end_token_id: int = 151645
    audio_frame_freq: int = FRAME_SAMPLES
    audio_token_index: int = 151646
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    tie_word_embeddings: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def codebook_size(self) -> int:
        """Codes the codec can decode (the audio vocab has a few more entries, which are never produced)."""
        return int(self.codec.get("codebook_size", 2048))

    @property
    def audio_vocab_size(self) -> int:
        return self.backbone.vocab_size

    @property
    def sample_rate(self) -> int:
        return int(self.codec.get("sampling_rate", CODEC_SAMPLE_RATE))

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.audio_frame_freq

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> ChromaConfig:
        if not isinstance(d, dict) or d.get("model_type") != "chroma":
            got = d.get("model_type") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"{where}: not a Chroma config (model_type={got!r}, expected 'chroma')")
        for key in ("thinker_config", "backbone_config", "decoder_config", "codec_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"{where}: missing section {key!r}")
        th = d["thinker_config"]
        if not isinstance(th.get("text_config"), dict) or not isinstance(th.get("audio_config"), dict):
            raise ConfigError(f"{where}: thinker_config needs 'text_config' and 'audio_config'")
        return cls(
            # Qwen2 has q/k/v biases whatever the config says.
            reasoner=TransformerConfig.from_dict(th["text_config"], f"{where}: thinker_config.text_config", True),
            audio_encoder=AudioEncoderConfig.from_dict(th["audio_config"], f"{where}: thinker_config.audio_config"),
            backbone=TransformerConfig.from_dict(d["backbone_config"], f"{where}: backbone_config"),
            decoder=TransformerConfig.from_dict(d["decoder_config"], f"{where}: decoder_config"),
            codec=dict(d["codec_config"]),
            audio_num_codebooks=int(d.get("audio_num_codebooks", 8)),
            codebook_eos_token_id=int(d.get("codebook_eos_token_id", 0)),
            codebook_pad_token_id=int(d.get("codebook_pad_token_id", 2050)),
            text_start_token_id=int(d.get("text_start_token_id", 151665)),
            text_end_token_id=int(d.get("text_end_token_id", 151666)),
            im_end_token_id=int(d.get("im_end_token_id", 151645)),
            audio_frame_freq=int(d.get("audio_frame_freq", FRAME_SAMPLES)),
            audio_token_index=int(th.get("audio_token_index", 151646)),
            audio_start_token_id=int(th.get("audio_start_token_id", 151647)),
            audio_end_token_id=int(th.get("audio_end_token_id", 151648)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            raw=d,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ChromaConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))


#: config.json key init-random sets, so speak/chat/serve can default to short demos and label the noise.
RANDOM_WEIGHTS_KEY = "openchroma_random_weights"
#: Default response length (seconds) for random-weight checkpoints: noise needs no minute-long answers.
RANDOM_DEMO_SECONDS = 4.0
#: The same, in 80 ms frames.
RANDOM_DEMO_FRAMES = round(RANDOM_DEMO_SECONDS * FRAME_RATE_HZ)


def is_random_checkpoint(model: str | Path) -> bool:
    """Whether ``model`` is a local directory written by init-random (its config.json says so; older ones are
    known by the README init-random writes). Hub ids and unreadable directories count as real weights."""
    path = Path(model).expanduser()
    try:
        if json.loads((path / "config.json").read_text()).get(RANDOM_WEIGHTS_KEY):
            return True
        return (path / "README.md").read_text().startswith("# Random-weight Chroma checkpoint")
    except (OSError, ValueError, AttributeError):
        return False


def response_frame_limit(model: str | Path, max_frames: int | None, default: int,
                         announce: Callable[[str], None] | None = _log.warning) -> int:
    """The longest response, in frames, for a model about to be loaded from ``model``: ``max_frames`` when given,
    else ``RANDOM_DEMO_FRAMES`` for an init-random checkpoint (it speaks noise: minutes of it help no one), else
    ``default``. Every path that loads a checkpoint (the CLI, ``Chroma``, ``Engine``, eval) applies this rule;
    ``announce`` says so when it shortens the answer."""
    if max_frames is not None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        return max_frames
    if not is_random_checkpoint(model):
        return default
    if announce is not None:
        announce(f"{model} has random weights (init-random): it speaks noise, so answers stop after "
                 f"{RANDOM_DEMO_SECONDS:g} s (--max-frames N / max_frames=N for more)")
    return min(RANDOM_DEMO_FRAMES, default)

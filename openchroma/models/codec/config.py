"""The Codec's configuration: the checkpoint's ``codec_config`` (a Hugging Face ``MimiConfig`` dict)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ...constants import CODEC_SAMPLE_RATE


@dataclass
class CodecConfig:
    """Sizes of the Codec, a Mimi codec (defaults: Kyutai's published Mimi)."""

    sampling_rate: int = CODEC_SAMPLE_RATE
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "constant"
    compress: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    use_conv_shortcut: bool = False
    vector_quantization_hidden_dimension: int = 256
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 250
    attention_bias: bool = False
    layer_scale_initial_scale: float | None = 0.01
    frame_rate_override: float | None = None  # ``frame_rate`` / ``_frame_rate`` of the HF config, if given

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.upsampling_ratios = [int(r) for r in self.upsampling_ratios]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecConfig:
        """Build from a Hugging Face ``CodecConfig`` dict (e.g. the checkpoint's ``codec_config``)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        rope = d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise NotImplementedError(f"Codec rope_type {rope_type!r} is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is not None:
            kw["rope_theta"] = float(theta)
        fr = d.get("frame_rate", d.get("_frame_rate"))
        if fr is not None:
            kw["frame_rate_override"] = float(fr)
        if "sliding_window" in d:
            kw["sliding_window"] = d["sliding_window"]
        if d.get("codebook_dim") is None and "hidden_size" in d:
            kw["codebook_dim"] = d["hidden_size"]
        return cls(**kw)

    @property
    def hop_length(self) -> int:
        """Samples per SEANet latent step (product of the upsampling ratios)."""
        return math.prod(self.upsampling_ratios)

    @property
    def encodec_frame_rate(self) -> int:
        """Rate of the SEANet latents (and of the transformers' positions)."""
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def frame_rate(self) -> float:
        """Rate of the codes (12.5 Hz for Mimi)."""
        if self.frame_rate_override is not None:
            return self.frame_rate_override
        return self.sampling_rate / (self.hop_length * 2)

    @property
    def resample(self) -> bool:
        """Whether a down/upsampling stage sits between the transformers and the quantizer."""
        return self.frame_rate != self.encodec_frame_rate

    @property
    def latent_stride(self) -> int:
        """Transformer positions per code frame."""
        return int(self.encodec_frame_rate / self.frame_rate) if self.resample else 1

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame (1920 for Mimi)."""
        return self.hop_length * self.latent_stride

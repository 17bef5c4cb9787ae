"""Kyutai's Mimi neural audio codec as plain PyTorch modules.

Parameter names follow the Hugging Face ``MimiModel`` layout as saved by transformers 5.0
(``encoder.layers.*``, ``encoder_transformer.*``, ``downsample.*``, ``quantizer.*``, ``upsample.*``,
``decoder_transformer.*``, ``decoder.layers.*``), so a checkpoint's ``codec_model.*`` tensors load with the
prefix stripped.

Whole-sequence ``encode``/``decode`` reproduce ``transformers.MimiModel``; ``decode_step`` decodes frame by
frame with an explicit, pre-allocated :class:`MimiDecoderState` (conv left contexts, transposed-conv
overlap-add tails, a ring KV cache sized to the sliding window, per-row positions) so batch rows can be at
different positions and be reset independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MimiConfig", "Mimi", "MimiDecoderState"]


@dataclass
class MimiConfig:
    """Sizes of a Mimi codec (defaults: Kyutai's published Mimi)."""

    sampling_rate: int = 24_000
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
    def from_dict(cls, d: dict[str, Any]) -> MimiConfig:
        """Build from a Hugging Face ``MimiConfig`` dict (e.g. the checkpoint's ``codec_config``)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        rope = d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise NotImplementedError(f"Mimi rope_type {rope_type!r} is not supported")
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


# ----------------------------------------------------------------------------------------------------
# Convolutions


def _pad1d(x: Tensor, paddings: tuple[int, int], mode: str) -> Tensor:
    """``F.pad`` that, like HF's ``_pad1d``, also allows reflect padding on inputs shorter than the pad."""
    if mode == "constant":
        return F.pad(x, paddings, "constant", 0.0)
    if mode != "reflect":
        return F.pad(x, paddings, mode)
    length = x.shape[-1]
    max_pad = max(paddings)
    extra = 0
    if length <= max_pad:
        extra = max_pad - length + 1
        x = F.pad(x, (0, extra))
    padded = F.pad(x, paddings, mode)
    return padded[..., : padded.shape[-1] - extra]


class MimiConv1d(nn.Module):
    """Conv1d with HF Mimi's causal (or asymmetric) padding; holds ``conv`` like HF."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        causal: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias
        )
        self.causal = causal
        self.pad_mode = pad_mode
        self.stride = stride
        self.kernel_eff = (kernel_size - 1) * dilation + 1
        self.padding_total = self.kernel_eff - stride
        self.padding_right = self.padding_total // 2
        self.padding_left = self.padding_total - self.padding_right
        self.state_index = -1  # slot in MimiDecoderState.buffers, set by Mimi for decoder-side convs

    def extra_padding(self, length: int) -> int:
        """Right padding so that the last window is complete (HF ``_get_extra_padding_for_conv1d``)."""
        num = length - self.kernel_eff + self.padding_total
        n_frames = -(-num // self.stride)  # ceil(num / stride) + 1 - 1
        ideal = n_frames * self.stride + self.kernel_eff - self.padding_total
        return ideal - length

    def forward(self, x: Tensor) -> Tensor:
        extra = self.extra_padding(x.shape[-1])
        if self.causal:
            x = _pad1d(x, (self.padding_total, extra), self.pad_mode)
        else:
            x = _pad1d(x, (self.padding_left, self.padding_right + extra), self.pad_mode)
        return self.conv(x)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        if self.stride != 1 or not self.causal:
            raise NotImplementedError("streaming supports causal stride-1 convs only")
        if self.padding_total <= 0:
            return None
        return torch.zeros(batch_size, self.conv.in_channels, self.padding_total, device=device, dtype=dtype)

    def step(self, x: Tensor, state: MimiDecoderState) -> Tensor:
        """Streaming forward on the next ``x`` samples, carrying the left context in ``state``."""
        buf = state.buffers[self.state_index]
        if buf is None:
            return self.conv(x)
        if self.pad_mode == "replicate":
            buf = torch.where(state.fresh[:, None, None], x[..., :1].expand_as(buf), buf)
        xx = torch.cat([buf, x], dim=-1)
        state.buffers[self.state_index].copy_(xx[..., xx.shape[-1] - self.padding_total :])
        return self.conv(xx)


class MimiConvTranspose1d(nn.Module):
    """ConvTranspose1d with HF Mimi's trimming; holds ``conv`` like HF."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        causal: bool = True,
        trim_right_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias
        )
        self.stride = stride
        self.padding_total = kernel_size - stride
        if causal:
            self.padding_right = math.ceil(self.padding_total * trim_right_ratio)
        else:
            self.padding_right = self.padding_total // 2
        self.padding_left = self.padding_total - self.padding_right
        self.state_index = -1

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y[..., self.padding_left : y.shape[-1] - self.padding_right]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        if self.padding_left != 0:
            raise NotImplementedError("streaming needs all transposed-conv trimming on the right")
        if self.padding_total <= 0:
            return None
        return torch.zeros(batch_size, self.conv.out_channels, self.padding_total, device=device, dtype=dtype)

    def step(self, x: Tensor, state: MimiDecoderState) -> Tensor:
        """Streaming forward: overlap-add the previous tail, keep the new one."""
        tail = state.buffers[self.state_index]
        y = self.conv(x)
        if tail is None:
            return y
        y[..., : self.padding_total] += tail  # the tail is kept without bias (zero state = no contribution)
        n = x.shape[-1] * self.stride
        tail.copy_(y[..., n:])
        if self.conv.bias is not None:
            tail.sub_(self.conv.bias[:, None])
        return y[..., :n]


class MimiResnetBlock(nn.Module):
    """SEANet residual block: ``x + conv(elu(conv(elu(x))))``."""

    def __init__(self, cfg: MimiConfig, dim: int, dilations: Sequence[int]) -> None:
        super().__init__()
        kernel_sizes = (cfg.residual_kernel_size, 1)
        hidden = dim // cfg.compress
        block: list[nn.Module] = []
        for i, (k, d) in enumerate(zip(kernel_sizes, dilations, strict=True)):
            cin = dim if i == 0 else hidden
            cout = dim if i == len(kernel_sizes) - 1 else hidden
            block += [
                nn.ELU(),
                MimiConv1d(cin, cout, k, dilation=d, causal=cfg.use_causal_conv, pad_mode=cfg.pad_mode),
            ]
        self.block = nn.ModuleList(block)
        self.shortcut: nn.Module = (
            MimiConv1d(dim, dim, 1, causal=cfg.use_causal_conv, pad_mode=cfg.pad_mode)
            if cfg.use_conv_shortcut
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.block:
            h = layer(h)
        return self.shortcut(x) + h

    def step(self, x: Tensor, state: MimiDecoderState) -> Tensor:
        h = x
        for layer in self.block:
            h = layer.step(h, state) if isinstance(layer, MimiConv1d) else layer(h)
        res = self.shortcut.step(x, state) if isinstance(self.shortcut, MimiConv1d) else x
        return res + h


class MimiSeanetEncoder(nn.Module):
    """SEANet encoder (HF ``MimiEncoder``)."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        c, pm = cfg.use_causal_conv, cfg.pad_mode
        layers: list[nn.Module] = [
            MimiConv1d(cfg.audio_channels, cfg.num_filters, cfg.kernel_size, causal=c, pad_mode=pm)
        ]
        scaling = 1
        for ratio in reversed(cfg.upsampling_ratios):
            dim = scaling * cfg.num_filters
            for j in range(cfg.num_residual_layers):
                layers.append(MimiResnetBlock(cfg, dim, [cfg.dilation_growth_rate**j, 1]))
            layers += [nn.ELU(), MimiConv1d(dim, dim * 2, ratio * 2, stride=ratio, causal=c, pad_mode=pm)]
            scaling *= 2
        layers += [
            nn.ELU(),
            MimiConv1d(
                scaling * cfg.num_filters, cfg.hidden_size, cfg.last_kernel_size, causal=c, pad_mode=pm
            ),
        ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MimiSeanetDecoder(nn.Module):
    """SEANet decoder (HF ``MimiDecoder``)."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        c, pm = cfg.use_causal_conv, cfg.pad_mode
        scaling = 2 ** len(cfg.upsampling_ratios)
        layers: list[nn.Module] = [
            MimiConv1d(cfg.hidden_size, scaling * cfg.num_filters, cfg.kernel_size, causal=c, pad_mode=pm)
        ]
        for ratio in cfg.upsampling_ratios:
            dim = scaling * cfg.num_filters
            layers += [
                nn.ELU(),
                MimiConvTranspose1d(
                    dim, dim // 2, ratio * 2, stride=ratio, causal=c, trim_right_ratio=cfg.trim_right_ratio
                ),
            ]
            for j in range(cfg.num_residual_layers):
                layers.append(MimiResnetBlock(cfg, dim // 2, (cfg.dilation_growth_rate**j, 1)))
            scaling //= 2
        layers += [
            nn.ELU(),
            MimiConv1d(cfg.num_filters, cfg.audio_channels, cfg.last_kernel_size, causal=c, pad_mode=pm),
        ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def step(self, x: Tensor, state: MimiDecoderState) -> Tensor:
        for layer in self.layers:
            x = layer.step(x, state) if hasattr(layer, "step") else layer(x)
        return x


# ----------------------------------------------------------------------------------------------------
# Transformer


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MimiLayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 0.01) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class MimiMLP(nn.Module):
    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise NotImplementedError(f"activation {cfg.hidden_act!r}")
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MimiAttention(nn.Module):
    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        assert cfg.head_dim is not None
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=b)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _expand_kv(self, k: Tensor) -> Tensor:
        rep = self.num_heads // self.num_kv_heads
        return k if rep == 1 else k.repeat_interleave(rep, dim=1)

    def _out(self, o: Tensor) -> Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self._qkv(x, cos, sin)
        k, v = self._expand_kv(k), self._expand_kv(v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and x.shape[1] > 1)
        return self._out(o)

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Tensor, slots: Tensor) -> Tensor:
        """``cache``: ``[2, B, Hkv, C, D]`` ring buffer, written at ``slots`` ``[B, T]`` before attending."""
        q, k, v = self._qkv(x, cos, sin)
        B, _, T, _ = k.shape
        rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
        # index_put, not scatter_: compiled, it updates the ring in place instead of copying it.
        cache[0][rows, :, slots] = k.transpose(1, 2)
        cache[1][rows, :, slots] = v.transpose(1, 2)
        kc, vc = self._expand_kv(cache[0]), self._expand_kv(cache[1])
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        return self._out(o)


class MimiTransformerLayer(nn.Module):
    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        ls = cfg.layer_scale_initial_scale if cfg.layer_scale_initial_scale is not None else 0.01
        self.self_attn = MimiAttention(cfg)
        self.mlp = MimiMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn_layer_scale = MimiLayerScale(cfg.hidden_size, ls)
        self.mlp_layer_scale = MimiLayerScale(cfg.hidden_size, ls)

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return self._mlp(x)

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Tensor, slots: Tensor) -> Tensor:
        h = self.self_attn.step(self.input_layernorm(x), cos, sin, mask, cache, slots)
        return self._mlp(x + self.self_attn_layer_scale(h))


class MimiTransformer(nn.Module):
    """Causal sliding-window transformer on ``[B, T, hidden]`` (HF ``MimiTransformerModel``)."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sliding_window = cfg.sliding_window
        self.layers = nn.ModuleList([MimiTransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> Tensor:
        d = self.cfg.head_dim
        assert d is not None
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    def refresh_inv_freq(self, device: torch.device) -> None:
        """Recompute the (float32) rotary frequencies on ``device``."""
        self.inv_freq = self._inv_freq(device)

    def _apply(self, fn, recurse: bool = True):  # keep inv_freq float32 across .to(dtype) / .half()
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin ``[..., T, head_dim]`` for integer ``positions`` ``[..., T]`` (float32 math, as HF)."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)
        cos, sin = self.rope(pos, x.dtype)
        mask = None
        W = self.sliding_window
        if W is not None and T >= W:
            delta = pos[:, None] - pos[None, :]
            mask = (delta >= 0) & (delta < W)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x

    def step(self, x: Tensor, state: MimiDecoderState) -> Tensor:
        """Process the next ``T`` tokens of each row at its own position, updating ``state`` in place."""
        T = x.shape[1]
        positions = state.pos[:, None] + torch.arange(T, device=x.device)  # [B, T]
        slots = positions % state.kv_pos.shape[1]
        state.kv_pos[torch.arange(x.shape[0], device=x.device)[:, None].expand_as(slots), slots] = positions
        kv_pos = state.kv_pos[:, None, :]
        delta = positions[:, :, None] - kv_pos
        assert self.sliding_window is not None
        mask = ((kv_pos >= 0) & (delta >= 0) & (delta < self.sliding_window))[:, None]  # [B, 1, T, C]
        cos, sin = self.rope(positions, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cos, sin, mask, state.kv[i], slots)
        state.pos.add_(T)
        return x


# ----------------------------------------------------------------------------------------------------
# Quantizer


class MimiEuclideanCodebook(nn.Module):
    """Holds ``embed_sum``, ``cluster_usage`` and ``initialized`` (vectors: embed_sum / usage)."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(cfg.codebook_size))
        self.register_buffer("embed_sum", torch.zeros(cfg.codebook_size, cfg.codebook_dim))

    def vectors(self, epsilon: float = 1e-5) -> Tensor:
        """Codebook vectors ``[codebook_size, codebook_dim]``, computed in float32."""
        return self.embed_sum.float() / self.cluster_usage.float().clamp(min=epsilon)[:, None]


class MimiVectorQuantization(nn.Module):
    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.codebook = MimiEuclideanCodebook(cfg)


class MimiResidualVectorQuantizer(nn.Module):
    def __init__(self, cfg: MimiConfig, num_quantizers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MimiVectorQuantization(cfg) for _ in range(num_quantizers)])
        self.input_proj: nn.Conv1d | None = None
        self.output_proj: nn.Conv1d | None = None
        if cfg.vector_quantization_hidden_dimension != cfg.hidden_size:
            self.input_proj = nn.Conv1d(
                cfg.hidden_size, cfg.vector_quantization_hidden_dimension, 1, bias=False
            )
            self.output_proj = nn.Conv1d(
                cfg.vector_quantization_hidden_dimension, cfg.hidden_size, 1, bias=False
            )


class MimiSplitResidualVectorQuantizer(nn.Module):
    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.num_semantic_quantizers = cfg.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = MimiResidualVectorQuantizer(
            cfg, cfg.num_semantic_quantizers
        )
        self.acoustic_residual_vector_quantizer = MimiResidualVectorQuantizer(
            cfg, cfg.num_quantizers - cfg.num_semantic_quantizers
        )

    def groups(self, num_codebooks: int) -> list[tuple[MimiResidualVectorQuantizer, int, int]]:
        """``(rvq, first codebook index, count)`` for the first ``num_codebooks`` codebooks."""
        ns = self.num_semantic_quantizers
        out = [(self.semantic_residual_vector_quantizer, 0, min(ns, num_codebooks))]
        if num_codebooks > ns:
            out.append((self.acoustic_residual_vector_quantizer, ns, num_codebooks - ns))
        return out


# ----------------------------------------------------------------------------------------------------
# Streaming state


def _row_mask(rows: Tensor | Sequence[int] | int | None, batch_size: int, device: torch.device) -> Tensor:
    if rows is None:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    if isinstance(rows, Tensor) and rows.dtype == torch.bool:
        if rows.shape != (batch_size,):
            raise ValueError(f"slot mask must have shape [{batch_size}], got {tuple(rows.shape)}")
        return rows.to(device)
    idx = torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)
    mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
    mask[idx] = True
    return mask


class MimiDecoderState:
    """Pre-allocated streaming state of the Mimi decoder for ``batch_size`` rows (:meth:`Mimi.decoder_state`).

    ``buffers``: conv left contexts / transposed-conv tails (``[B, C, n]``, None when a layer needs none);
    ``kv``: ``[layers, 2, B, kv_heads, capacity, head_dim]`` ring cache; ``kv_pos``: ``[B, capacity]``
    position held by each slot (-1: empty); ``pos``: ``[B]`` next transformer position (25 Hz) of each row;
    ``fresh``: ``[B]`` rows that have not stepped since their reset (used for replicate padding).
    """

    def __init__(
        self, buffers: list[Tensor | None], kv: Tensor, kv_pos: Tensor, pos: Tensor, fresh: Tensor
    ) -> None:
        self.buffers = buffers
        self.kv = kv
        self.kv_pos = kv_pos
        self.pos = pos
        self.fresh = fresh

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def reset(self, rows: Tensor | Sequence[int] | int | None = None) -> None:
        """Zero the state of the chosen rows (bool mask ``[B]``, indices, or None for all), in place."""
        mask = _row_mask(rows, self.batch_size, self.pos.device)
        for buf in self.buffers:
            if buf is not None:
                buf.masked_fill_(mask[:, None, None], 0)
        self.kv.masked_fill_(mask[None, None, :, None, None, None], 0)
        self.kv_pos.masked_fill_(mask[:, None], -1)
        self.pos.masked_fill_(mask, 0)
        self.fresh.masked_fill_(mask, True)


# ----------------------------------------------------------------------------------------------------
# The codec


class Mimi(nn.Module):
    """Mimi codec; uses the first ``num_codebooks`` codebooks for encode/decode.

    Call :meth:`refresh_buffers` after changing codebook or projection tensors by hand (``load_state_dict``
    does it).
    """

    def __init__(self, cfg: MimiConfig, num_codebooks: int = 8) -> None:
        super().__init__()
        if not cfg.num_semantic_quantizers <= num_codebooks <= cfg.num_quantizers:
            raise ValueError(f"num_codebooks={num_codebooks} out of range")
        self.cfg = cfg
        self.num_codebooks = num_codebooks
        self.encoder = MimiSeanetEncoder(cfg)
        self.encoder_transformer = MimiTransformer(cfg)
        stride = cfg.latent_stride
        self.downsample: MimiConv1d | None = None
        self.upsample: MimiConvTranspose1d | None = None
        if cfg.resample:
            self.downsample = MimiConv1d(
                cfg.hidden_size,
                cfg.hidden_size,
                2 * stride,
                stride=stride,
                bias=False,
                causal=cfg.use_causal_conv,
                pad_mode="replicate",
            )
        self.quantizer = MimiSplitResidualVectorQuantizer(cfg)
        if cfg.resample:
            self.upsample = MimiConvTranspose1d(
                cfg.hidden_size,
                cfg.hidden_size,
                2 * stride,
                stride=stride,
                groups=cfg.upsample_groups,
                bias=False,
                causal=cfg.use_causal_conv,
                trim_right_ratio=cfg.trim_right_ratio,
            )
        self.decoder_transformer = MimiTransformer(cfg)
        self.decoder = MimiSeanetDecoder(cfg)

        self._stream_modules: list[MimiConv1d | MimiConvTranspose1d] = []
        for m in ([self.upsample] if self.upsample is not None else []) + list(self.decoder.modules()):
            if isinstance(m, (MimiConv1d, MimiConvTranspose1d)):
                m.state_index = len(self._stream_modules)
                self._stream_modules.append(m)

        # Derived, non-persistent: codebook vectors for encoding [K, N, Dq] and decode tables [K, N, hidden]
        # (codebook vectors through the output projection).
        self.register_buffer("codebook_vectors", torch.empty(0), persistent=False)
        self.register_buffer("decode_table", torch.empty(0), persistent=False)
        self.register_buffer(
            "codebook_offsets", torch.arange(num_codebooks) * cfg.codebook_size, persistent=False
        )
        self.refresh_buffers()
        self.register_load_state_dict_post_hook(Mimi._after_load)

    @staticmethod
    def _after_load(module: nn.Module, _incompatible_keys: Any) -> None:
        assert isinstance(module, Mimi)
        module.refresh_buffers()

    # ---- properties -------------------------------------------------------------------------------
    @property
    def frame_size(self) -> int:
        """Audio samples per code frame."""
        return self.cfg.frame_size

    @property
    def sampling_rate(self) -> int:
        return self.cfg.sampling_rate

    @property
    def frame_rate(self) -> float:
        return self.cfg.frame_rate

    @property
    def _ref_weight(self) -> Tensor:
        """A weight giving the module's device and compute dtype."""
        return self.decoder.layers[0].conv.weight

    # ---- derived buffers --------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_buffers(self) -> None:
        """Precompute codebook vectors / decode tables (float32 math) and rotary frequencies."""
        ref = self._ref_weight
        self.encoder_transformer.refresh_inv_freq(ref.device)
        self.decoder_transformer.refresh_inv_freq(ref.device)
        self.codebook_offsets = torch.arange(self.num_codebooks, device=ref.device) * self.cfg.codebook_size
        if ref.device.type == "meta":
            return
        vecs, tables = [], []
        for rvq, _, count in self.quantizer.groups(self.num_codebooks):
            for layer in rvq.layers[:count]:
                e = layer.codebook.vectors()
                vecs.append(e)
                if rvq.output_proj is not None:
                    e = e @ rvq.output_proj.weight[:, :, 0].float().t()
                tables.append(e)
        self.codebook_vectors = torch.stack(vecs).to(ref.dtype)
        self.decode_table = torch.stack(tables).to(ref.dtype)

    # ---- encode -----------------------------------------------------------------------------------
    def _quantize(self, latents: Tensor) -> Tensor:
        """latents ``[B, hidden, F]`` -> codes ``[B, K, F]`` (HF's residual argmin via ``torch.cdist``)."""
        B, _, Fr = latents.shape
        codes = []
        for rvq, first, count in self.quantizer.groups(self.num_codebooks):
            h = rvq.input_proj(latents) if rvq.input_proj is not None else latents
            residual = h.transpose(1, 2)  # [B, F, Dq]
            for i in range(first, first + count):
                embed = self.codebook_vectors[i]
                flat = residual.reshape(-1, residual.shape[-1])
                ind = torch.cdist(flat[None].float(), embed[None].float(), p=2)[0].argmin(dim=-1).view(B, Fr)
                residual = residual - F.embedding(ind, embed)
                codes.append(ind)
        return torch.stack(codes, dim=1)

    @torch.no_grad()
    def encode_latents(self, audio: Tensor) -> Tensor:
        """audio ``[B, T]`` (or ``[B, C, T]``) -> continuous latents ``[B, hidden, ceil(T / frame_size)]``."""
        x = audio[:, None] if audio.dim() == 2 else audio
        x = x.to(self._ref_weight.dtype)
        h = self.encoder(x)
        h = self.encoder_transformer(h.transpose(1, 2)).transpose(1, 2)
        if self.downsample is not None:
            h = self.downsample(h)
        return h

    @torch.no_grad()
    def encode(self, audio: Tensor) -> Tensor:
        """audio ``[B, T]`` float at 24 kHz -> codes ``[B, num_codebooks, ceil(T / frame_size)]`` int64."""
        return self._quantize(self.encode_latents(audio))

    # ---- decode -----------------------------------------------------------------------------------
    def _dequantize(self, codes: Tensor) -> Tensor:
        """codes ``[B, K, F]`` -> latents ``[B, hidden, F]`` (sum of the projected codebook vectors)."""
        K = codes.shape[1]
        if K > self.num_codebooks:
            raise ValueError(f"got {K} codebooks, this Mimi decodes at most {self.num_codebooks}")
        idx = codes.long() + self.codebook_offsets[:K, None]
        table = self.decode_table.view(-1, self.decode_table.shape[-1])
        return F.embedding(idx, table).sum(dim=1).transpose(1, 2)

    def _squeeze(self, audio: Tensor) -> Tensor:
        return audio[:, 0] if self.cfg.audio_channels == 1 else audio

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[B, K, F]`` -> audio ``[B, F * frame_size]`` (whole sequence at once)."""
        h = self._dequantize(codes)
        if self.upsample is not None:
            h = self.upsample(h)
        h = self.decoder_transformer(h.transpose(1, 2)).transpose(1, 2)
        return self._squeeze(self.decoder(h))

    def decoder_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_frames_per_step: int = 1,
    ) -> MimiDecoderState:
        """Fresh (zeroed) streaming state for ``batch_size`` rows, in the module's device/dtype by default;
        ``decode_step`` then takes up to ``max_frames_per_step`` frames per call. Codes must be below
        ``codebook_size`` (not checked, to avoid a host sync)."""
        ref = self._ref_weight
        device = torch.device(device) if device is not None else ref.device
        dtype = dtype or ref.dtype
        W = self.cfg.sliding_window
        if W is None:
            raise NotImplementedError("streaming decode needs a sliding window")
        if not self.cfg.use_causal_conv or self.cfg.pad_mode not in ("constant", "replicate"):
            raise NotImplementedError("streaming decode needs causal convs with constant/replicate padding")
        tokens = max_frames_per_step * self.cfg.latent_stride
        capacity = -(-(W + tokens - 1) // 8) * 8  # every slot a query may need survives the step's writes
        buffers = [m.init_state(batch_size, device, dtype) for m in self._stream_modules]
        a = self.decoder_transformer.layers[0].self_attn
        kv = torch.zeros(
            len(self.decoder_transformer.layers),
            2,
            batch_size,
            a.num_kv_heads,
            capacity,
            a.head_dim,
            device=device,
            dtype=dtype,
        )
        kv_pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        fresh = torch.ones(batch_size, dtype=torch.bool, device=device)
        return MimiDecoderState(buffers, kv, kv_pos, pos, fresh)

    @torch.no_grad()
    def decode_step(self, codes: Tensor, state: MimiDecoderState) -> Tensor:
        """codes ``[B, K, n]`` (n = 1 usually) -> audio ``[B, n * frame_size]``; updates ``state``."""
        if codes.shape[0] != state.batch_size:
            raise ValueError(f"codes batch {codes.shape[0]} != state batch {state.batch_size}")
        if codes.shape[-1] * self.cfg.latent_stride > state.kv.shape[-2] - self.cfg.sliding_window + 1:
            raise ValueError("more frames per step than the state was sized for (max_frames_per_step)")
        h = self._dequantize(codes)
        if self.upsample is not None:
            h = self.upsample.step(h, state)
        h = self.decoder_transformer.step(h.transpose(1, 2), state).transpose(1, 2)
        audio = self.decoder.step(h, state)
        if self.cfg.pad_mode == "replicate":
            state.fresh.zero_()
        return self._squeeze(audio)

"""SEANet convolutions of the Codec: padded (causal) convs, residual blocks, the encoder and the decoder.

Each conv holds ``conv`` like transformers' Mimi so the checkpoint's names load. The decoder-side convs also
``step``: streaming forward on the next samples, carrying left contexts / overlap-add tails in a
:class:`~.state.CodecStreamState`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CodecConfig
from .state import CodecStreamState


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


class SeanetConv1d(nn.Module):
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
        self.state_index = -1  # slot in CodecStreamState.buffers, set by Codec for decoder-side convs

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

    def step(self, x: Tensor, state: CodecStreamState) -> Tensor:
        """Streaming forward on the next ``x`` samples, carrying the left context in ``state``."""
        buf = state.buffers[self.state_index]
        if buf is None:
            return self.conv(x)
        if self.pad_mode == "replicate":
            buf = torch.where(state.fresh[:, None, None], x[..., :1].expand_as(buf), buf)
        xx = torch.cat([buf, x], dim=-1)
        state.buffers[self.state_index].copy_(xx[..., xx.shape[-1] - self.padding_total :])
        return self.conv(xx)


class SeanetConvTranspose1d(nn.Module):
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

    def step(self, x: Tensor, state: CodecStreamState) -> Tensor:
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


class SeanetResnetBlock(nn.Module):
    """SEANet residual block: ``x + conv(elu(conv(elu(x))))``."""

    def __init__(self, cfg: CodecConfig, dim: int, dilations: Sequence[int]) -> None:
        super().__init__()
        kernel_sizes = (cfg.residual_kernel_size, 1)
        hidden = dim // cfg.compress
        block: list[nn.Module] = []
        for i, (k, d) in enumerate(zip(kernel_sizes, dilations, strict=True)):
            cin = dim if i == 0 else hidden
            cout = dim if i == len(kernel_sizes) - 1 else hidden
            block += [
                nn.ELU(),
                SeanetConv1d(cin, cout, k, dilation=d, causal=cfg.use_causal_conv, pad_mode=cfg.pad_mode),
            ]
        self.block = nn.ModuleList(block)
        self.shortcut: nn.Module = (
            SeanetConv1d(dim, dim, 1, causal=cfg.use_causal_conv, pad_mode=cfg.pad_mode)
            if cfg.use_conv_shortcut
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.block:
            h = layer(h)
        return self.shortcut(x) + h

    def step(self, x: Tensor, state: CodecStreamState) -> Tensor:
        h = x
        for layer in self.block:
            h = layer.step(h, state) if isinstance(layer, SeanetConv1d) else layer(h)
        res = self.shortcut.step(x, state) if isinstance(self.shortcut, SeanetConv1d) else x
        return res + h


class SeanetEncoder(nn.Module):
    """SEANet encoder (HF ``MimiEncoder``)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        c, pm = cfg.use_causal_conv, cfg.pad_mode
        layers: list[nn.Module] = [
            SeanetConv1d(cfg.audio_channels, cfg.num_filters, cfg.kernel_size, causal=c, pad_mode=pm)
        ]
        scaling = 1
        for ratio in reversed(cfg.upsampling_ratios):
            dim = scaling * cfg.num_filters
            for j in range(cfg.num_residual_layers):
                layers.append(SeanetResnetBlock(cfg, dim, [cfg.dilation_growth_rate**j, 1]))
            layers += [nn.ELU(), SeanetConv1d(dim, dim * 2, ratio * 2, stride=ratio, causal=c, pad_mode=pm)]
            scaling *= 2
        layers += [
            nn.ELU(),
            SeanetConv1d(
                scaling * cfg.num_filters, cfg.hidden_size, cfg.last_kernel_size, causal=c, pad_mode=pm
            ),
        ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SeanetDecoder(nn.Module):
    """SEANet decoder (HF ``MimiDecoder``)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        c, pm = cfg.use_causal_conv, cfg.pad_mode
        scaling = 2 ** len(cfg.upsampling_ratios)
        layers: list[nn.Module] = [
            SeanetConv1d(cfg.hidden_size, scaling * cfg.num_filters, cfg.kernel_size, causal=c, pad_mode=pm)
        ]
        for ratio in cfg.upsampling_ratios:
            dim = scaling * cfg.num_filters
            layers += [
                nn.ELU(),
                SeanetConvTranspose1d(
                    dim, dim // 2, ratio * 2, stride=ratio, causal=c, trim_right_ratio=cfg.trim_right_ratio
                ),
            ]
            for j in range(cfg.num_residual_layers):
                layers.append(SeanetResnetBlock(cfg, dim // 2, (cfg.dilation_growth_rate**j, 1)))
            scaling //= 2
        layers += [
            nn.ELU(),
            SeanetConv1d(cfg.num_filters, cfg.audio_channels, cfg.last_kernel_size, causal=c, pad_mode=pm),
        ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def step(self, x: Tensor, state: CodecStreamState) -> Tensor:
        for layer in self.layers:
            x = layer.step(x, state) if hasattr(layer, "step") else layer(x)
        return x

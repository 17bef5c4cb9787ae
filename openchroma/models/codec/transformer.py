"""The Codec's causal sliding-window transformers (one after the encoder, one before the decoder).

Layer names follow transformers' ``MimiTransformerModel`` (``self_attn``, ``mlp.fc1/fc2``, layer norms,
``*_layer_scale.scale``). ``forward`` runs a whole sequence; ``step`` runs the next tokens of each row at its
own position against the ring KV cache of a :class:`~.state.CodecStreamState`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import RopeConfig
from ..attention import SelfAttention, rope_inv_freq
from .config import CodecConfig
from .state import CodecStreamState


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 0.01) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class CodecMLP(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise NotImplementedError(f"activation {cfg.hidden_act!r}")
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CodecTransformerLayer(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        assert cfg.head_dim is not None
        ls = cfg.layer_scale_initial_scale if cfg.layer_scale_initial_scale is not None else 0.01
        self.self_attn = SelfAttention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            qkv_bias=cfg.attention_bias,
            out_bias=cfg.attention_bias,
        )
        self.mlp = CodecMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size, ls)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size, ls)

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return self._mlp(x)

    def step(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Tensor, rows: Tensor, slots: Tensor
    ) -> Tensor:
        """``cache``: ``[2, B, Hkv, C, D]`` ring buffer, written at ``slots`` ``[B, T]`` before attending."""
        h = self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, cache[0], cache[1], rows, slots, mask)
        return self._mlp(x + self.self_attn_layer_scale(h))


class CodecTransformer(nn.Module):
    """Causal sliding-window transformer on ``[B, T, hidden]`` (HF ``MimiTransformerModel``)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sliding_window = cfg.sliding_window
        self.layers = nn.ModuleList([CodecTransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.init_buffers()

    def init_buffers(self, device: torch.device | None = None) -> None:
        """(Re)compute the float32 rotary frequencies on ``device`` (derived, not saved)."""
        assert self.cfg.head_dim is not None
        inv_freq = rope_inv_freq(RopeConfig(theta=self.cfg.rope_theta), self.cfg.head_dim, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse: bool = True):  # keep inv_freq float32 across .to(dtype) / .half()
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.init_buffers(self.inv_freq.device)
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

    def step(self, x: Tensor, state: CodecStreamState) -> Tensor:
        """Process the next ``T`` tokens of each row at its own position, updating ``state`` in place."""
        B, T = x.shape[:2]
        positions = state.pos[:, None] + torch.arange(T, device=x.device)  # [B, T]
        slots = positions % state.kv_pos.shape[1]
        rows = torch.arange(B, device=x.device)[:, None].expand_as(slots)
        state.kv_pos[rows, slots] = positions
        kv_pos = state.kv_pos[:, None, :]
        delta = positions[:, :, None] - kv_pos
        assert self.sliding_window is not None
        mask = ((kv_pos >= 0) & (delta >= 0) & (delta < self.sliding_window))[:, None]  # [B, 1, T, C]
        cos, sin = self.rope(positions, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cos, sin, mask, state.kv[i], rows, slots)
        state.pos.add_(T)
        return x

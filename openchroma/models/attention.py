"""Rotary position embedding and grouped-query self-attention, shared by the Reasoner's, Backbone's and
Decoder's transformer stacks (:mod:`.transformer`) and the Codec's transformers (:mod:`.codec.transformer`).

Rope is the "rotate half" form (``x * cos + rotate_half(x) * sin``) of Llama, Qwen2 and Mimi; attention is
``F.scaled_dot_product_attention`` with ``enable_gqa``, either over the step's own keys (whole-sequence
encoding) or over a pre-allocated KV cache written at explicit slots (fixed shapes for CUDA graphs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (float32), as transformers computes them for the default and llama3 rope types."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class SelfAttention(nn.Module):
    """Multi-head self-attention with rope on q/k and ``num_kv_heads`` key/value heads (GQA).

    Parameter names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) are the checkpoints'.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries ``[B, heads, T, D]`` and keys, values ``[B, kv_heads, T, D]``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **sdpa: object) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_kv_heads != self.num_heads, **sdpa)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend within ``x`` ``[B, T, H]``: under ``mask`` (True = attend), else causally."""
        q, k, v = self._qkv(x, cos, sin)
        return self._attend(q, k, v, attn_mask=mask, is_causal=mask is None and x.shape[1] > 1)

    def forward_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Write this step's keys/values into ``k_cache``/``v_cache`` ``[B, kv_heads, L, D]`` at ``slots``
        ``[B, T]`` of ``rows``, then attend over the first ``kv_len`` slots (all by default) under ``mask``."""
        q, k, v = self._qkv(x, cos, sin)
        # Each row writes its own slots: fixed shapes, no host sync. An index_put (not scatter_) so that
        # torch.compile updates the cache in place instead of copying it.
        k_cache[rows, :, slots] = k.transpose(1, 2)
        v_cache[rows, :, slots] = v.transpose(1, 2)
        if kv_len is not None:
            k_cache, v_cache = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        return self._attend(q, k_cache, v_cache, attn_mask=mask)

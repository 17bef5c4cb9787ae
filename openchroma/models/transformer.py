"""Llama / Qwen2 style decoder stack with an explicit, pre-allocated KV cache.

One implementation serves the Reasoner's text model (q/k/v bias, default rope), the Backbone
(llama3 rope) and the Decoder (codebooks 1-7 of a frame). Every forward takes explicit rope positions and cache
slots per batch row, so rows of a batch can sit at different positions (batched sessions) and the
shapes stay fixed (CUDA graphs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeConfig, TransformerConfig
from .attention import SelfAttention, rope_inv_freq


class RotaryTable(nn.Module):
    """cos/sin of every position up to ``max_positions``, computed once in float32 (derived, not saved)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int):
        super().__init__()
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        self.init_buffers()

    def init_buffers(self, device: torch.device | None = None) -> None:
        """(Re)compute the tables on ``device`` (default: the current default device, e.g. ``meta``)."""
        inv_freq = rope_inv_freq(self.rope, self.head_dim, device)
        freqs = torch.arange(self.max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, T] -> [B, 1, T, D], broadcast over heads
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class KVCache:
    """Keys and values of every layer, ``[layers, batch, kv_heads, max_len, head_dim]``, allocated once."""

    def __init__(
        self,
        cfg: TransformerConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len

    def copy_rows_(self, dst: int, src: KVCache, src_row: int, length: int) -> None:
        """Copy the first ``length`` slots of ``src``'s row ``src_row`` into our row ``dst``."""
        self.k[:, dst, :, :length].copy_(src.k[:, src_row, :, :length])
        self.v[:, dst, :, :length].copy_(src.v[:, src_row, :, :length])


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                       qkv_bias=cfg.qkv_bias)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, rows, slots, mask, kv_len):
        h = self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, k_cache, v_cache, rows, slots, mask,
                                          kv_len)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder stack over input embeddings; ``norm`` is applied to the output."""

    def __init__(self, cfg: TransformerConfig, with_embedding: bool = False, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        if with_embedding:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryTable(cfg.rope, cfg.head_dim, max_positions or cfg.max_position_embeddings)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.norm.weight
        return KVCache(self.cfg, batch_size, max_len, device or p.device, dtype or p.dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Run ``x`` ``[B, T, H]`` at rope ``positions`` ``[B, T]``, writing the cache at ``slots``.

        ``slots`` defaults to ``positions``. A query at slot ``s`` sees every cache slot ``<= s`` of
        its row, so the caller owns what the cache holds. ``kv_len`` (a host int, at least the
        largest slot + 1) bounds the attended length; by default the whole cache.
        """
        if slots is None:
            slots = positions
        b, t, _ = x.shape
        kv_len = cache.max_len if kv_len is None else kv_len
        cos, sin = self.rotary(positions, x.dtype)
        key_slots = torch.arange(kv_len, device=x.device)
        mask = (key_slots.view(1, 1, 1, kv_len) <= slots.view(b, 1, t, 1))
        rows = torch.arange(b, device=x.device).view(b, 1).expand(b, t)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], rows, slots, mask, kv_len)
        return self.norm(x)

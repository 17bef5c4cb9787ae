"""The Codec's split residual vector quantizer (one semantic + acoustic codebooks).

Only the tensors live here (names as in the checkpoint); :class:`~.model.Codec` turns them into lookup tables
once after loading and quantizes/dequantizes with them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import CodecConfig


class EuclideanCodebook(nn.Module):
    """Holds ``embed_sum``, ``cluster_usage`` and ``initialized`` (vectors: embed_sum / usage)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(cfg.codebook_size))
        self.register_buffer("embed_sum", torch.zeros(cfg.codebook_size, cfg.codebook_dim))

    def vectors(self, epsilon: float = 1e-5) -> Tensor:
        """Codebook vectors ``[codebook_size, codebook_dim]``, computed in float32."""
        return self.embed_sum.float() / self.cluster_usage.float().clamp(min=epsilon)[:, None]


class VectorQuantization(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.codebook = EuclideanCodebook(cfg)


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, cfg: CodecConfig, num_quantizers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(cfg) for _ in range(num_quantizers)])
        self.input_proj: nn.Conv1d | None = None
        self.output_proj: nn.Conv1d | None = None
        if cfg.vector_quantization_hidden_dimension != cfg.hidden_size:
            self.input_proj = nn.Conv1d(
                cfg.hidden_size, cfg.vector_quantization_hidden_dimension, 1, bias=False
            )
            self.output_proj = nn.Conv1d(
                cfg.vector_quantization_hidden_dimension, cfg.hidden_size, 1, bias=False
            )


class SplitResidualVectorQuantizer(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.num_semantic_quantizers = cfg.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = ResidualVectorQuantizer(
            cfg, cfg.num_semantic_quantizers
        )
        self.acoustic_residual_vector_quantizer = ResidualVectorQuantizer(
            cfg, cfg.num_quantizers - cfg.num_semantic_quantizers
        )

    def groups(self, num_codebooks: int) -> list[tuple[ResidualVectorQuantizer, int, int]]:
        """``(rvq, first codebook index, count)`` for the first ``num_codebooks`` codebooks."""
        ns = self.num_semantic_quantizers
        out = [(self.semantic_residual_vector_quantizer, 0, min(ns, num_codebooks))]
        if num_codebooks > ns:
            out.append((self.acoustic_residual_vector_quantizer, ns, num_codebooks - ns))
        return out

"""Weight-only quantized layers: int8 (per output channel), int4 (groups along the input), fp8 (e4m3, per channel).

A layer holds its weight in the kernel's own layout for its device, built once from the *canonical* tensors a
pre-quantized checkpoint stores (``qweight``, ``scales``, ``zeros``; see :mod:`openchroma.quantization`):

* int8 on CPU: ``torch._weight_int8pack_mm`` (int8 ``[N, K]``, one scale per row);
* int4 on CPU: ``torch._weight_int4pack_mm_for_cpu``; on CUDA ``torch._weight_int4pack_mm`` (tinygemm
  tiles). Both compute ``(q - 8) * scale + zero`` per group of ``group_size`` inputs;
* anything else (int8 on CUDA where torch has no int8 kernel, fp8): the weight is upcast inside the matmul.

Activations reach the int8/int4 kernels in bfloat16 (float16 for a float16 model): torch's CPU kernels are
4-5x slower with float32 activations, and CUDA's int4 kernel takes bfloat16 only. The result is cast back.
Every branch is chosen at construction, so the forward is one straight line for ``torch.compile(fullgraph)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_PAD_ROWS = 64   # CPU int4 packing needs rows in multiples of 16, CUDA's in multiples of 8


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Canonical int4 (two codes a byte, the even column in the high nibble) -> int32 codes ``[N, K]``."""
    hi = (packed >> 4).to(torch.int32)
    lo = (packed & 15).to(torch.int32)
    return torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def _cuda_int8_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build has ``_weight_int8pack_mm`` on ``device`` (it does on CPU; CUDA varies)."""
    try:
        x = torch.zeros(1, 32, device=device, dtype=dtype)
        torch._weight_int8pack_mm(x, torch.zeros(32, 32, device=device, dtype=torch.int8),
                                  torch.ones(32, device=device, dtype=dtype))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` ``[out_features, in_features]`` quantized (weights only)."""

    def __init__(self, canonical: dict[str, torch.Tensor], scheme: str, in_features: int, out_features: int,
                 device: torch.device, dtype: torch.dtype, shared: QuantEmbedding | None = None):
        """``canonical``: ``qweight`` (and ``scales``, ``zeros``, ``bias``) as stored; ``shared``: an int8
        embedding table this layer reads as its weight (a tied output head)."""
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, in_features, out_features
        self.dtype = dtype
        self.kdtype = kernel_dtype(dtype)
        self.group_size = 0
        self.rows = out_features
        bias = canonical.get("bias")
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype), persistent=False)
        if shared is not None:
            self.mode = "int8_kernel" if shared.qweight.device.type == "cpu" else "upcast"
            self.register_buffer("qweight", shared.qweight, persistent=False)
            self.register_buffer("scales", shared.scales.view(-1), persistent=False)
            return
        q = canonical["qweight"]
        if scheme == "int4":
            self._init_int4(q, canonical["scales"], canonical["zeros"], device)
        elif scheme == "int8":
            native = device.type == "cpu" or _cuda_int8_kernel(device, self.kdtype)
            self.mode = "int8_kernel" if native else "upcast"
            self.register_buffer("qweight", q.to(device), persistent=False)
            self.register_buffer("scales", canonical["scales"].to(device, self.kdtype if native else dtype),
                                 persistent=False)
        elif scheme == "fp8":
            self.mode = "upcast"
            self.register_buffer("qweight", q.to(device), persistent=False)
            self.register_buffer("scales", canonical["scales"].to(device, dtype), persistent=False)
        else:
            raise ValueError(f"unknown quantization scheme {scheme!r}")

    def _init_int4(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, device: torch.device):
        n, k = self.out_features, self.in_features
        self.group_size = k // scales.shape[1]
        self.rows = -(-n // INT4_PAD_ROWS) * INT4_PAD_ROWS
        pad = self.rows - n
        codes = unpack_int4(packed.to(device))
        if pad:  # padded rows: code 8 with scale 0 and zero 0 give weight 0; their outputs are sliced off
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
            scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(device, self.kdtype)
        if device.type == "cpu":
            self.mode = "int4_cpu"
            w = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        else:
            self.mode = "int4_cuda"
            self.kdtype = torch.bfloat16
            sz = sz.to(torch.bfloat16)
            tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            w = torch._convert_weight_to_int4pack((codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8), tiles)
        self.register_buffer("qweight", w, persistent=False)
        self.register_buffer("scales_and_zeros", sz, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode != "upcast":  # the kernels take contiguous activations of their own dtype
            x2 = x2.to(self.kdtype).contiguous()
        if self.mode == "int8_kernel":
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales).to(x.dtype)
        elif self.mode == "int4_cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size,
                                                 self.scales_and_zeros).to(x.dtype)
        elif self.mode == "int4_cuda":
            y = torch._weight_int4pack_mm(x2, self.qweight, self.group_size,
                                          self.scales_and_zeros).to(x.dtype)
        else:
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.rows != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.in_features} -> {self.out_features}, {self.scheme}{g}, {self.mode}"


class QuantEmbedding(nn.Module):
    """An embedding table in int8, one scale per row (the Reasoner's 151,936 rows); rows come out in ``dtype``."""

    def __init__(self, canonical: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("qweight", canonical["qweight"].to(device), persistent=False)
        # Scales in the kernel dtype: a tied output head reads them with the int8 kernel.
        self.register_buffer("scales", canonical["scales"].to(device, kernel_dtype(dtype)).view(-1, 1),
                             persistent=False)
        self.num_embeddings, self.embedding_dim = self.qweight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.dtype) * F.embedding(ids, self.scales).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class QuantCodebookHeads(nn.Module):
    """The Decoder's per-codebook heads, each a :class:`QuantLinear` (``[V, H]``, the stored ``[H, V]``
    transposed); called as ``heads(h, i)`` like :class:`openchroma.models.chroma.CodebookHeads`."""

    def __init__(self, heads: list[QuantLinear]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, h: torch.Tensor, i: int) -> torch.Tensor:
        return self.heads[i](h)

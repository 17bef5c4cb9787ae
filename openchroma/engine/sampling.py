"""How audio codes are chosen: per-request parameters, and one batched sampler for the whole step.

The sampler takes each row's temperature, top-k, top-p, seed and counter as tensors, so a batch of
sessions with different settings is sampled by the same fixed-shape ops (no per-row Python, no host
sync: it runs inside the compiled, graph-captured frame step). Randomness is counter-based: the noise
for a row is a hash of (its seed, its frame and codebook, the code), never a shared generator's state,
so a seeded session gives the same audio alone or beside any others.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

MAX_TEMPERATURE = 100.0


@dataclass
class SamplingParams:
    """How audio codes are chosen. ``temperature`` 0 is greedy (the reference's behaviour).

    ``seed`` makes sampling reproducible; without one, each response draws a fresh random seed.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or not 0 <= t <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {t!r}")
        if 0 < t < 1e-3:
            raise ValueError(f"temperature must be 0 (greedy) or at least 0.001, got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 1_000_000:
            raise ValueError(f"top_k must be an integer >= 0, got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63):
            raise ValueError(f"seed must be a non-negative integer, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def row_seed(self) -> int:
        """The 31-bit seed this response's rows use (a fresh random one when none was given)."""
        if self.seed is None:
            return random.getrandbits(31)
        return self.seed % (2**31)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (16-bit halves)."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply rounds), elementwise on int64 tensors."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[B, n]`` that depends only on each row's ``seed`` and ``counter`` ``[B]``."""
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    x = _hash32(idx[None, :] + 0x9E3779B9)
    x = _hash32(x ^ counter[:, None])
    x = _hash32(x ^ seed[:, None])
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))   # in (0, 1)
    return -torch.log(-torch.log(u))


def sample_codes(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    greedy_only: bool,
) -> torch.Tensor:
    """Choose one code per row from ``logits`` ``[B, V]``; rows with temperature 0 take the argmax.

    Sampling rows draw from ``softmax(logits / temperature)`` restricted to their top-k codes and then to the
    smallest prefix whose mass reaches top-p (Gumbel-max over the kept codes). ``greedy_only`` (a static
    flag) skips the sampling ops when no row samples.
    """
    greedy = logits.argmax(-1)
    if greedy_only:
        return greedy
    logits = logits.float()
    v = logits.shape[-1]
    scaled = logits / temperature.clamp_min(1e-3)[:, None]
    ordered = scaled.sort(dim=-1, descending=True).values
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))
    rank = torch.arange(v, device=logits.device)[None, :]
    ordered = ordered.masked_fill(rank >= k[:, None], float("-inf"))
    probs = ordered.softmax(-1)
    # keep the smallest prefix whose mass reaches top_p (at least one code)
    keep = ((probs.cumsum(-1) - probs) <= top_p[:, None]) & (rank < k[:, None])
    n_keep = keep.sum(-1).clamp(min=1)
    threshold = ordered.gather(-1, (n_keep - 1)[:, None])
    masked = scaled.masked_fill(scaled < threshold, float("-inf"))
    sampled = (masked + gumbel_noise(seed, counter, v)).argmax(-1)
    return torch.where(temperature > 0, sampled, greedy)

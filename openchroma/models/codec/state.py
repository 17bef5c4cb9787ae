"""The Codec's streaming-decode state: everything ``Codec.decode_step`` carries from one frame to the next."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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


class CodecStreamState:
    """Pre-allocated streaming-decode state for ``batch_size`` rows (made by :meth:`Codec.stream_state`).

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

    def rows(self, b: int) -> CodecStreamState:
        """A view of the first ``b`` rows (shares this state's storage)."""
        return CodecStreamState(
            [None if x is None else x[:b] for x in self.buffers],
            self.kv[:, :, :b],
            self.kv_pos[:b],
            self.pos[:b],
            self.fresh[:b],
        )

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

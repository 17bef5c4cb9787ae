"""Matrix-vector time of one vector by sixteen 8192 x 2048 matrices (1 GB in float32, more than the cache holds)
in float32, bfloat16, int8 and int4, with torch's CPU kernels the quantized layers use. One intra-op thread, timed
in this process's CPU seconds (best of 3), so a busy shared machine disturbs it less; prints markdown rows."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

ROWS, COLS, COUNT, GROUP = 8192, 2048, 16, 128


def best_ms(fn: Callable[[], object], calls: int = 10) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t) / calls * 1000)
    return best


def measure(name: str, x: torch.Tensor) -> float:
    """One scheme, its matrices built here (and freed on return)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(ROWS, COLS, generator=gen) for _ in range(COUNT)]
    if name == "float32":
        return best_ms(lambda: [x @ w.t() for w in mats])
    xb = x.bfloat16()
    if name == "bfloat16":
        mats = [w.bfloat16() for w in mats]
        return best_ms(lambda: [xb @ w.t() for w in mats])
    if name == "int8":
        mats = [(w / (w.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8) for w in mats]
        scales = torch.rand(ROWS).bfloat16()
        return best_ms(lambda: [torch._weight_int8pack_mm(xb, q, scales) for q in mats])
    mats = [torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (ROWS, COLS), dtype=torch.int32), 1)
            for _ in range(COUNT)]
    scales_zeros = torch.rand(COLS // GROUP, ROWS, 2).bfloat16()
    return best_ms(lambda: [torch._weight_int4pack_mm_for_cpu(xb, p, GROUP, scales_zeros) for p in mats])


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(1, COLS, generator=torch.Generator().manual_seed(1))
    labels = {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8 (bf16 act)",
              "int4": f"int4 g{GROUP} (bf16 act)"}
    times = {name: measure(name, x) for name in labels}
    for name, ms in times.items():
        print(f"| {labels[name]} | {ms:.2f} ms | {times['float32'] / ms:.2f}x |")


if __name__ == "__main__":
    main()

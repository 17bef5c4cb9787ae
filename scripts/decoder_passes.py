"""The Decoder's cache residency (issue 22 item 6): CPU time of pass 1 against passes 2-7 of each frame.

    python scripts/decoder_passes.py --model /tmp/chroma-mid --scheme int4 --threads 1

Part 1 times every call of the Decoder's transformer during greedy responses through the one-slot stepper
(eager): pass 1 (2 positions: the Backbone's hidden state and codebook 0) comes right after the Backbone, the
Codec and, every other frame, the Reasoner have streamed their weights through the cache; passes 2-7 (1 position
each) follow each other with only a small output head in between. Part 2 times one 1-position pass in isolation,
hot (repeated back to back) and cold (after streaming a buffer larger than the last-level cache), which bounds
what residency can give. Clocks count this process's CPU seconds (``time.process_time``): on a shared machine
they leave out the time other processes take, not their contention for caches and memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SCHEMES = {"float32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8"),
           "int4": ("float32", "int4")}


def timed_calls(module: torch.nn.Module, log: list[tuple[int, float]]) -> None:
    """Record (positions, CPU seconds) of every call of ``module``."""
    forward = module.forward

    def run(x, *args, **kwargs):
        t = time.process_time()
        out = forward(x, *args, **kwargs)
        log.append((x.shape[1], time.process_time() - t))
        return out

    module.forward = run


def in_frame(log: list[tuple[int, float]], skip: int) -> dict[str, float]:
    """Median ms of pass 1 and of passes 2-7 over the frames of ``log`` (a frame starts at a 2-position call)."""
    frames, cur = [], []
    for n, s in log:
        if n == 2:
            if len(cur) == 7:
                frames.append(cur)
            cur = []
        cur.append(s)
    if len(cur) == 7:
        frames.append(cur)
    frames = frames[skip:]
    first = [f[0] * 1e3 for f in frames]
    rest = [statistics.fmean(f[1:]) * 1e3 for f in frames]
    return {"frames": len(frames), "pass1_ms": statistics.median(first), "pass2_7_ms": statistics.median(rest),
            "per_pass_ms": [round(statistics.median(f[i] * 1e3 for f in frames), 2) for i in range(7)]}


def isolated(model, flush_bytes: int, repeats: int) -> dict[str, float]:
    """CPU ms of one 1-position Decoder pass: hot (back to back) and cold (after evicting the cache)."""
    dec = model.decoder
    k = model.cfg.audio_num_codebooks
    cache = dec.model.new_cache(1, k)
    param = dec.model.norm.weight
    x = torch.randn(1, 1, dec.model.cfg.hidden_size, dtype=param.dtype)
    pos = model.decoder_positions[2:3].expand(1, 1)
    slot = pos.new_full((1, 1), 2)
    flush = torch.ones(flush_bytes // 4, dtype=torch.float32)

    def one() -> float:
        t = time.process_time()
        dec.model(x, pos, cache, slot, kv_len=k)
        return (time.process_time() - t) * 1e3

    with torch.inference_mode():
        for _ in range(3):
            one()
        hot = [one() for _ in range(repeats)]
        cold = []
        for _ in range(repeats):
            flush.add_(1.0)  # reads and writes the whole buffer: the Decoder's weights leave the cache
            cold.append(one())
    return {"hot_ms": statistics.median(hot), "cold_ms": statistics.median(cold)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--scheme", default="int4", choices=list(SCHEMES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frames", type=int, default=16, help="frames of the timed response")
    p.add_argument("--flush-mib", type=int, default=1024, help="buffer streamed to evict the cache (part 2)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    from openchroma.loading import load
    from openchroma.pipeline import Chroma
    from openchroma.quantization import info_report
    from openchroma.tokenizer import ChatTokenizer
    from openchroma.tools.bench import per_frame

    torch.set_num_threads(args.threads)
    dtype, quantize = SCHEMES[args.scheme]
    lm = load(args.model, dtype=dtype, quantize=quantize, progress=False)
    decoder_bytes = info_report(lm)["parts"].get("decoder", {}).get("weight_bytes")
    chroma = Chroma(lm, ChatTokenizer.from_dir(lm.path))
    log: list[tuple[int, float]] = []
    timed_calls(lm.model.decoder.model, log)
    per_frame(chroma, 2, args.frames, warmup=True)
    row = {"scheme": args.scheme, "threads": args.threads, "decoder_weight_bytes": decoder_bytes,
           **in_frame(log, skip=4), **isolated(lm.model, args.flush_mib << 20, args.repeats)}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Low-memory benchmark: for each weight scheme, load a checkpoint in a fresh process and measure weight bytes, peak
memory and (optionally) the per-frame time of one greedy response (the bench's per-frame mode: a long minus a
short response), then print one markdown table.

    python scripts/bench_low_memory.py --model /tmp/chroma-mid                      # float32 bf16 int8 int4
    python scripts/bench_low_memory.py --model /tmp/chroma-4b --no-frames           # memory only
    python scripts/bench_low_memory.py --model M --schemes bf16 int4 --device cuda

Each scheme runs in its own process, so its peak resident memory (``ru_maxrss``) is its own. On a shared or
noisy machine repeat the run: per-frame times are the only noisy column. On a machine shared with other
busy processes, ``--threads 1 --cpu-time`` counts the CPU seconds of the benchmark's own process instead of wall
seconds, which leaves out the time the others took (cache and memory-bandwidth contention still count).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SCHEMES = {"float32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8"),
           "int4": ("float32", "int4"), "fp8": ("bfloat16", "fp8"),
           "int8-bf16": ("bfloat16", "int8"), "int4-bf16": ("bfloat16", "int4")}


def child(args: argparse.Namespace) -> None:
    """One scheme, in this process: prints one JSON line."""
    import resource
    import time

    import torch

    from openchroma.loading import load
    from openchroma.pipeline import Chroma
    from openchroma.quantization import info_report
    from openchroma.tokenizer import ChatTokenizer

    dtype, quantize = SCHEMES[args.child]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:  # the bench's clocks count this process's CPU seconds: time other processes take is left out
        import types

        import openchroma.engine.stepper as stepper_module
        import openchroma.tools.bench as bench_module

        clock = types.SimpleNamespace(perf_counter=time.process_time)
        bench_module.time = stepper_module.time = clock
    t0 = time.perf_counter()
    lm = load(args.model, device=args.device, dtype=dtype, quantize=quantize, progress=False)
    load_s = time.perf_counter() - t0
    info = info_report(lm)
    row = {"scheme": args.child, "dtype": dtype, "quantize": quantize, "load_seconds": round(load_s, 1),
           "weight_bytes": info["weight_bytes"], "parts": info["parts"], "load_peak_rss_bytes": info["peak_rss_bytes"]}
    if "peak_cuda_bytes" in info:
        row["load_peak_cuda_bytes"] = info["peak_cuda_bytes"]
    if args.frames:
        from openchroma.tools.bench import per_frame

        chroma = Chroma(lm, ChatTokenizer.from_dir(lm.path))
        r = per_frame(chroma, args.short, args.long, compile=args.compile)
        row.update(ms_per_frame=r["ms_per_frame"], stages_ms=r["stages_ms_long_run"])
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(row), flush=True)


def table(rows: list[dict]) -> str:
    base = next((r.get("ms_per_frame") for r in rows if r["scheme"] == "float32"), None)
    lines = ["| weights | weight bytes | peak RSS at load | ms per frame | vs float32 |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        ms = r.get("ms_per_frame")
        speed = f"{base / ms:.2f}x" if ms and base else ""
        lines.append(f"| {r['scheme']} | {r['weight_bytes'] / 2**30:.2f} GiB | "
                     f"{r['load_peak_rss_bytes'] / 2**30:.2f} GiB | {'' if ms is None else f'{ms:.1f}'} | {speed} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--schemes", nargs="+", default=["float32", "bf16", "int8", "int4"], choices=list(SCHEMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-frames", dest="frames", action="store_false", help="memory only (no per-frame time)")
    p.add_argument("--short", type=int, default=24)
    p.add_argument("--long", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="time the compiled frame step")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time frames in this process's CPU seconds, not wall seconds (for a busy shared machine; "
                        "use with --threads 1, where CPU time is the time the frame would take alone)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    rows = []
    for scheme in args.schemes:
        cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--child", scheme,
               "--short", str(args.short), "--long", str(args.long)] + ([] if args.frames else ["--no-frames"]) \
            + (["--compile"] if args.compile else []) + (["--cpu-time"] if args.cpu_time else []) \
            + ["--threads", str(args.threads)]
        print(f"{scheme} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")), None)
        if line is None:
            print(f"{scheme} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

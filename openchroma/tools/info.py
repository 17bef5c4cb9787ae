"""``openchroma info``: load a checkpoint and print its size, load time and peak memory."""

from __future__ import annotations

import argparse
import json
import resource
import time

from ..cli_args import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Load a checkpoint and print its size, load time and peak memory (with --json: parameters, "
                     "weight bytes and peak memory, per part, and the layers a quantization scheme left as they were).")
    add_model_arguments(p, quantize=True)
    p.add_argument("--json", action="store_true",
                   help="one JSON object with per-part parameters and weight_bytes, peak_rss_bytes (and "
                        "peak_cuda_bytes on CUDA)")


def run(args: argparse.Namespace) -> int:
    from ..loading import load
    from ..quantization import info_report

    t0 = time.perf_counter()
    lm = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"path": str(lm.path), "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                          "load_seconds": round(dt, 2), **info_report(lm)}, indent=2))
        return 0
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"path": str(lm.path), "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                      "quantize": lm.quantize, "parameters": lm.num_parameters, "load_seconds": round(dt, 2),
                      "peak_rss_mib": round(peak_rss_mib, 1)}, indent=2))
    return 0

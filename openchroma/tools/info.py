"""``openchroma info``: load a checkpoint and print its size, load time and peak memory."""

from __future__ import annotations

import argparse
import json
import resource
import time

from ..cli_args import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..loading import load

    t0 = time.perf_counter()
    lm = load(args.model, device=args.device, dtype=args.dtype)
    dt = time.perf_counter() - t0
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"path": str(lm.path), "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                      "parameters": lm.num_parameters, "load_seconds": round(dt, 2),
                      "peak_rss_mib": round(peak_rss_mib, 1)}, indent=2))
    return 0

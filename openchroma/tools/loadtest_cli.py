"""``openchroma loadtest``'s arguments and entry point (the load test itself is ``tools/loadtest.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import UsageError, env_default


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(",")) if "," in text else (float(text),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or LO,HI seconds, got {text!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI, got {text!r}")
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("N realtime clients (websockets) stream synthetic speech-like user audio paced in real time, "
                     "commit and ask for a response, and listen with a playback clock; some barge in "
                     "(response.cancel) or drop the connection mid-answer. Reports TTFT from the end of speech to "
                     "the first audio, gaps between audio deltas, playback underruns, cancel latency, errors and "
                     "refused sessions as loadtest.json, loadtest.md and loadtest.png under --out.")
    p.add_argument("--server", required=True, metavar="URL", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=4, metavar="N", help="concurrent clients (default: 4)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S",
                   help="seconds of load; each client then finishes its turn (default: 60)")
    p.add_argument("--out", default="loadtest-results", metavar="DIR", help="output directory")
    p.add_argument("--api-key", default=env_default("OPENCHROMA_API_KEY"), help="the server's API key")
    p.add_argument("--voice", default=None, help="library voice to answer in (default: the server's default)")
    p.add_argument("--voice-audio", default=None, metavar="FILE",
                   help="register this reference audio first (as --voice, default name 'loadtest')")
    p.add_argument("--voice-text", default=None, metavar="TEXT", help="transcript of --voice-audio")
    p.add_argument("--turn-seconds", type=_range, default=(1.0, 3.0), metavar="LO,HI",
                   help="user speech per turn, drawn uniformly (default: 1,3)")
    p.add_argument("--response-tokens", type=int, default=25, metavar="N",
                   help="max_output_tokens per answer; 2 frames (160 ms) each (default: 25)")
    p.add_argument("--barge-in", type=float, default=0.2, metavar="P", help="chance a turn is interrupted (0.2)")
    p.add_argument("--disconnect", type=float, default=0.05, metavar="P",
                   help="chance a turn ends with the client dropping the connection (0.05)")
    p.add_argument("--jitter-ms", type=float, default=100.0, metavar="MS",
                   help="playback starts this long after the first audio delta (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for audio and choices (default: 0)")
    p.add_argument("--abuse", action="store_true",
                   help="run the clients alone, then again beside abusive clients (conversation-item floods, "
                        "15 MiB appends, long chat audio parts), and report both runs' gaps and underruns")


def run(args: argparse.Namespace) -> int:
    from ..reporting import require
    from .abuse import AbuseConfig
    from .loadtest import LoadConfig, loadtest

    if args.clients < 1 or args.duration <= 0:
        raise UsageError("--clients must be at least 1 and --duration positive")
    if (args.voice_audio is None) != (args.voice_text is None):
        raise UsageError("--voice-audio and --voice-text go together")
    require(["matplotlib"], "bench", "loadtest")
    cfg = LoadConfig(server=args.server, clients=args.clients, duration=args.duration, out=Path(args.out),
                     api_key=args.api_key or None, voice=args.voice,
                     voice_audio=Path(args.voice_audio) if args.voice_audio else None, voice_text=args.voice_text,
                     turn_seconds=args.turn_seconds, response_tokens=args.response_tokens, barge_in=args.barge_in,
                     disconnect=args.disconnect, jitter_ms=args.jitter_ms, seed=args.seed,
                     abuse=AbuseConfig() if args.abuse else None)
    summary, paths = loadtest(cfg)
    print(paths["md"].read_text(), end="")
    print(f"\nwrote {paths['json']}, {paths['md']} and {paths['png']}")
    return 0

"""``openchroma chat``: answer one user turn (audio and/or text) in a cloned voice, to an audio file."""

from __future__ import annotations

import argparse

from ..cli_args import UsageError, add_model_arguments
from .speak import add_generation_arguments, check_generation_args, load_with_voice, sampling, write_reply


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Answer one user turn (audio and/or text) in a cloned voice."
    add_model_arguments(p, quantize=True)
    p.add_argument("--audio", help="the user's audio (wav, flac, ogg, mp3; any rate)")
    p.add_argument("--text", help="the user's text")
    add_generation_arguments(p)


def run(args: argparse.Namespace) -> int:
    if not args.audio and not (args.text or "").strip():
        raise UsageError("give --audio and/or --text" + (" (--text is empty)" if args.text is not None else ""))
    max_frames = check_generation_args(args)
    chroma, voice = load_with_voice(args, max_frames)
    reply = chroma.chat(voice, audio=args.audio, text=args.text or None, sampling=sampling(args))
    write_reply(reply, args.out, args.model)
    return 0

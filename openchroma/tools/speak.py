"""``openchroma speak``: say a given text in a cloned voice, to an audio file; and what ``chat`` shares with it
(the voice and sampling flags, the checks that run before the model loads, writing the reply)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..cli_args import add_max_frames_argument, add_model_arguments, check_audio_arg, check_max_frames

# --out suffix -> (libsndfile format, subtype): what speak/chat can write.
OUT_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
               ".mp3": ("MP3", "MPEG_LAYER_III")}

# Why a random-weight checkpoint's reply has no text: shown next to the empty text, where users look for it.
RANDOM_TEXT_NOTE = ("random weights (init-random): the reasoner writes random tokens, which decode to no words "
                    "(often only blanks), and the audio is noise")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voice-audio", required=True, help="reference audio of the voice to clone (1-30 s)")
    p.add_argument("--voice-text", required=True, help="transcript of the reference audio")
    p.add_argument("--out", default="reply.wav",
                   help="where to write the 24 kHz audio: .wav, .flac, .ogg or .mp3 (default: reply.wav)")
    add_max_frames_argument(p)
    p.add_argument("--temperature", type=float, default=0.0, help="audio-code sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest codes (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def check_out_path(out: str) -> None:
    """Raise ``ValueError`` when ``out`` cannot be written (folder missing or read-only, unknown extension), so a
    bad ``--out`` fails before the model loads rather than after it has generated."""
    path = Path(out).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name such as {path / 'reply.wav'}")
    if suffix not in OUT_FORMATS:
        raise ValueError(f"--out {out}: cannot write {suffix or 'extension-less'} files; "
                         f"use one of {', '.join(OUT_FORMATS)}")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {out}: not writable (check the permissions of {folder})")


def check_generation_args(args: argparse.Namespace) -> int:
    """Every check that needs no model, before it loads; returns the response's frame limit."""
    from ..config import response_frame_limit
    from ..pipeline import DEFAULT_MAX_FRAMES

    if not args.voice_text.strip():
        raise ValueError("--voice-text is empty: give the words spoken in the reference audio")
    check_max_frames(args.max_frames)
    check_out_path(args.out)
    check_audio_arg("--voice-audio", args.voice_audio)
    if getattr(args, "audio", None):
        check_audio_arg("--audio", args.audio)
    return response_frame_limit(args.model, args.max_frames, DEFAULT_MAX_FRAMES,
                                announce=lambda msg: print(msg, file=sys.stderr))


def sampling(args: argparse.Namespace):
    from ..engine.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def load_with_voice(args: argparse.Namespace, max_frames: int):
    """The model (its replies capped at ``max_frames``) and the cloned voice."""
    from ..pipeline import Chroma

    chroma = Chroma.from_pretrained(args.model, device=args.device, dtype=args.dtype, max_frames=max_frames,
                                    quantize=args.quantize)
    return chroma, chroma.voice(args.voice_audio, args.voice_text)


def write_reply(reply, out: str, model: str) -> None:
    """Write the audio as ``out``'s extension says and print the reply as one JSON line."""
    import soundfile as sf

    from ..config import is_random_checkpoint

    fmt, subtype = OUT_FORMATS[Path(out).suffix.lower()]
    sf.write(str(Path(out).expanduser()), reply.audio.detach().float().cpu().numpy(), reply.sample_rate,
             format=fmt, subtype=subtype)
    secs = reply.audio.numel() / reply.sample_rate
    line = {"text": reply.text, "audio": out, "seconds": round(secs, 2), "stop_reason": reply.result.stop_reason}
    if not reply.text.strip() and is_random_checkpoint(model):
        line["note"] = RANDOM_TEXT_NOTE
    print(json.dumps(line, ensure_ascii=False))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Say the given text in a cloned voice (the forced-text path)."
    add_model_arguments(p, quantize=True)
    p.add_argument("--text", required=True, help="what to say")
    add_generation_arguments(p)


def run(args: argparse.Namespace) -> int:
    if not args.text.strip():
        raise ValueError("--text is empty: nothing to say")
    max_frames = check_generation_args(args)
    chroma, voice = load_with_voice(args, max_frames)
    write_reply(chroma.speak(args.text, voice, sampling=sampling(args)), args.out, args.model)
    return 0

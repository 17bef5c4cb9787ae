"""Command-line pieces every ``openchroma`` command shares: the model-loading flags, ``--compile``, list parsers,
and the checks that run before a model loads.

A command lives in its own module (``tools/bench.py``, ``serving/cli.py``, ...) as two functions,
``add_arguments(parser)`` and ``run(args) -> int | None``, and one row in ``openchroma.cli.COMMANDS``. This
module sits low (it imports nothing heavy), so commands in ``serving/`` as well as ``tools/`` may use it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PUBLISHED_MODEL = "FlashLabs/Chroma-4B"
MODEL_HELP = "checkpoint directory or Hugging Face hub repo id (e.g. FlashLabs/Chroma-4B)"
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
    """Arguments that do not go together; ``openchroma`` prints the message and exits with status 2."""


def add_model_arguments(parser: argparse.ArgumentParser, dtype: str | None = "float32", model: str | None = None,
                        required: bool = True, model_help: str = MODEL_HELP, quantize: bool = False) -> None:
    """``--model``, ``--device``, ``--dtype``: every flag that says which model loads and how.

    ``dtype=None``: bfloat16 on CUDA, float32 on CPU (``resolve_dtype``). ``model``: a default (else
    ``--model`` is required, unless ``required=False``)."""
    if model is None:
        parser.add_argument("--model", required=required, default=None, help=model_help)
    else:
        parser.add_argument("--model", default=model, help=f"{model_help} (default: {model})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=dtype, choices=DTYPES,
                        help=f"weights and activations dtype (default: {dtype or 'bfloat16 on CUDA, float32 on CPU'})")
    if quantize:
        add_quantize_argument(parser)


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """``--quantize {int8,int4,fp8}`` for a command that loads a model."""
    from .constants import QUANTIZE_SCHEMES

    parser.add_argument("--quantize", default=None, choices=QUANTIZE_SCHEMES,
                        help="quantize weights at load: int8 or int4 (CPU and CUDA), fp8 (CUDA, compute capability "
                             "8.9+); a pre-quantized checkpoint needs no flag (see docs/low-memory.md)")


def resolve_dtype(dtype: str | None, device: str | None) -> str:
    """``--dtype``, or bfloat16 on CUDA and float32 elsewhere when it was left out."""
    if dtype is not None:
        return dtype
    import torch

    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return "bfloat16" if on_cuda else "float32"


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="compile the frame step with torch.compile (inductor) before the first response; takes "
                             "a minute or more per batch size at load (default: off; on a GPU the step is also "
                             "captured as CUDA graphs)")


def add_max_frames_argument(parser: argparse.ArgumentParser, what: str = "response") -> None:
    parser.add_argument("--max-frames", type=int, default=None,
                        help=f"at most this many 80 ms frames per {what} (default 750 = 60 s; 50 = 4 s for "
                             "init-random checkpoints, which speak noise)")


def int_list(text: str) -> list[int]:
    """``1,2,4`` -> ``[1, 2, 4]`` (positive integers), for argparse."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def env_default(name: str) -> str | None:
    return os.environ.get(name) or None


def check_model_arg(model: str) -> None:
    """Raise ``CheckpointError`` when ``model`` names a local checkpoint that is not there or not a checkpoint.
    Hub ids (``org/name``, not an existing path) are left to the loader, which downloads them."""
    from .config import ChromaConfig
    from .loading import CheckpointError, checkpoint_files

    path = Path(model).expanduser()
    if path.is_dir():
        ChromaConfig.from_file(path / "config.json")   # raises ConfigError (a ValueError) naming the problem
        checkpoint_files(path)
        return
    if path.exists():
        raise CheckpointError(f"{model}: not a directory (give the checkpoint directory, not a file)")
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise CheckpointError(f"{model}: no such checkpoint directory (and not a hub repo id like "
                              "'FlashLabs/Chroma-4B'; `openchroma init-random --preset small --out DIR` writes "
                              "a random-weight one for demos)")


def check_audio_arg(flag: str, path: str) -> None:
    """Decode ``path`` once (``AudioError`` naming the flag when it is missing or unreadable) before any loading."""
    from .audio import AudioError, load_audio

    try:
        load_audio(path, 24000)
    except AudioError as e:
        raise AudioError(f"{flag} {e}") from None


def check_max_frames(max_frames: int | None) -> None:
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames must be at least 1, got {max_frames}")

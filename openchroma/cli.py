"""The ``openchroma`` command: a table of subcommands, each in its own module.

A command's module defines ``add_arguments(parser: argparse.ArgumentParser) -> None`` (it may also set
``parser.description`` and ``parser.epilog``) and ``run(args: argparse.Namespace) -> int | None`` (None means 0).
Adding a command is one row of ``COMMANDS``; modules are imported only for the command that runs, so
``openchroma --help`` starts fast. Flags shared by commands (the model to load, ``--compile``) live in
``openchroma.cli_args``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .cli_args import PUBLISHED_MODEL, UsageError

__all__ = ["COMMANDS", "PUBLISHED_MODEL", "build_parser", "main"]

# (command, module with add_arguments and run, one-line help), in the order --help lists them.
COMMANDS: list[tuple[str, str, str]] = [
    ("chat", "openchroma.tools.chat", "answer one spoken or written turn in a cloned voice, to a WAV file"),
    ("speak", "openchroma.tools.speak", "say a given text in a cloned voice (text to speech), to a WAV file"),
    ("conformance", "openchroma.tools.conformance", "check a checkpoint against reference case files"),
    ("init-random", "openchroma.tools.init_random",
     "write a random-weight checkpoint (speaks noise; for tests/benchmarks)"),
    ("prepare", "openchroma.training.prepare", "run the frozen parts (Mimi, reasoner) over a training manifest, once"),
    ("train", "openchroma.training.train_cli",
     "fine-tune the Backbone and Decoder (LoRA or full; torchrun for many GPUs)"),
    ("synth", "openchroma.training.synth",
     "make training data: questions -> answers (LLM) -> speech in your voices (TTS)"),
    ("info", "openchroma.tools.info", "load a checkpoint and print its size, load time and peak memory"),
    ("quantize", "openchroma.tools.quantize", "write a pre-quantized checkpoint (int8, int4 or fp8 weights)"),
    ("fidelity", "openchroma.tools.fidelity",
     "compare a quantized (or bf16) model with float32, teacher-forced on reference cases"),
    ("bench", "openchroma.tools.bench", "measure time to first audio and real-time factor under concurrent sessions"),
    ("loadtest", "openchroma.tools.loadtest_cli",
     "load-test a running server with N realtime clients (TTFT, gaps, underruns)"),
    ("serve", "openchroma.serving.cli",
     "run the real-time voice server (OpenAI Realtime, chat, speech, browser client)"),
    ("eval", "openchroma.eval.run", "measure SIM, WER, TTFT and RTF over a test list (the paper's measurements)"),
    ("listen", "openchroma.eval.listen", "blind A/B listening test in the browser (NCMOS/SCMOS preferences)"),
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openchroma")
    except PackageNotFoundError:   # run from a checkout that is not installed
        from . import __version__

        return __version__


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata is slow to import)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the installed version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"openchroma {_version()}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``command``) one whose other subcommands carry only their help line, so that only
    ``command``'s module is imported."""
    parser = argparse.ArgumentParser(
        prog="openchroma",
        description="OpenChroma: real-time spoken dialogue with voice cloning (FlashLabs Chroma 1.0 weights).",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help in COMMANDS:
        p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
        if command is None or name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    known = {name for name, _, _ in COMMANDS}
    # Only the named command's module is imported ("--help" alone imports none).
    parser = build_parser(next((a for a in argv if not a.startswith("-")), "") if argv else "")
    args = parser.parse_args(argv)
    if args.command not in known or not getattr(args, "run", None):
        parser.print_help()
        return 2
    from .audio import AudioError
    from .loading import CheckpointError
    from .reporting import MissingExtra
    from .tools.conformance import CaseError

    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"openchroma {args.command}: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, CaseError, AudioError, MissingExtra, ValueError) as e:
        print(f"openchroma {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

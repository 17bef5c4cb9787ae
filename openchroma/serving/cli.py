"""``openchroma serve``: its flags come from ``ServerConfig``'s fields (one flag per field, the help in the field's
metadata), so each default is written once, and a new field is a new flag with no edit here."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import typing
from pathlib import Path
from typing import Any

from ..cli_args import PUBLISHED_MODEL, add_model_arguments, check_model_arg, resolve_dtype

DESCRIPTION = ("Serve one model over HTTP and WebSocket: the OpenAI Realtime protocol at /v1/realtime (server "
               "VAD, barge-in, user transcripts; works with Pipecat and LiveKit Agents), /v1/chat/completions and "
               "/v1/audio/speech (streaming), /v1/audio/transcriptions, a persistent voice library at /v1/voices, "
               "/v1/models, /metrics (Prometheus), /health, and a browser client at /. The model loads in the "
               "background; /health answers 503 until it is ready.")


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type a flag parses, whether it is a repeatable list) of a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], True
    if args and typing.get_origin(hint) is not None:   # X | None
        return args[0], False
    return hint, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return f"{default:g}"
    return "none" if default in (None, ()) else str(default)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type = None) -> None:
    """One flag per field of ``config_cls`` (``ServerConfig``) not already on ``parser``. Flags default to
    absent (``argparse.SUPPRESS``): ``config_from_args`` passes only the given ones, so the dataclass's defaults
    apply."""
    from .config import ServerConfig

    config_cls = config_cls or ServerConfig
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        name = "--" + meta.get("name", f.name.replace("_", "-"))
        if name in parser._option_string_actions:   # e.g. --model, --device, --dtype: the shared model flags
            continue
        kind, repeated = _base_type(hints[f.name])
        default = _default_of(f)
        help = meta.get("help", f.name.replace("_", " "))
        if "default" not in help.lower():
            help += f" (default: {_shown(default / meta['scale'] if 'scale' in meta else default)})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help.replace("%", "%%")}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = float if "scale" in meta else kind
            kw["metavar"] = meta.get("metavar", "MIB" if "scale" in meta else None)
            if repeated:
                kw["action"] = "append"
        parser.add_argument(name, **kw)


def config_from_args(args: argparse.Namespace, config_cls: type = None, **values: Any):
    """``config_cls`` from the flags given (scaled back to the field's unit) and ``values``."""
    from .config import ServerConfig

    config_cls = config_cls or ServerConfig
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in values or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if "scale" in f.metadata:
            value = value * f.metadata["scale"]
            value = int(value) if _base_type(hints[f.name])[0] is int else value
        if _base_type(hints[f.name])[1]:
            value = tuple(value)
        values[f.name] = value
    return config_cls(**values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_model_arguments(p, dtype=None, model=PUBLISHED_MODEL, quantize=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_config_arguments(p)


def check_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` when ``host:port`` cannot be listened on (taken, or not this machine's address)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            hint = " (is another server running there? pick another --port)" if e.errno == errno.EADDRINUSE else ""
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None


def _voice_library_location(config) -> str:
    if config.voices_db:
        from .voice_store_base import redact

        return redact(config.voices_db)
    return str(Path(config.data_dir) / "voices")


def run(args: argparse.Namespace) -> int:
    import logging

    from ..config import RANDOM_DEMO_SECONDS, is_random_checkpoint
    from .app import create_app, run_server

    # Fail at start-up, before anything loads in the background: a server that can never answer must not run.
    check_model_arg(args.model)
    check_port_free(args.host, args.port)
    random_weights = is_random_checkpoint(args.model)
    values: dict[str, Any] = {"model": args.model, "device": args.device,
                              "dtype": resolve_dtype(args.dtype, args.device),
                              "api_key": getattr(args, "api_key", None) or os.environ.get("OPENCHROMA_API_KEY") or None,
                              "model_id": getattr(args, "model_id", None) or Path(str(args.model)).name.lower()}
    if random_weights and not hasattr(args, "max_response_seconds"):
        values["max_response_seconds"] = RANDOM_DEMO_SECONDS
    config = config_from_args(args, **values)
    if config.scale_out:
        from .ray_app import serve_on_ray

        return serve_on_ray(config, args.host, args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
    print(f"OpenChroma: loading {args.model} ({config.dtype}) in the background; GET /health says when it is ready.\n"
          f"  browser client:  http://{shown}:{args.port}/\n"
          f"  OpenAI base_url: http://{shown}:{args.port}/v1   (realtime: ws://{shown}:{args.port}/v1/realtime)\n"
          f"  voice library:   {_voice_library_location(config)}" + ("\n  API key required" if config.api_key else ""))
    if random_weights:
        print(f"  RANDOM WEIGHTS (init-random): the model speaks noise, so its answers have no text and stop after "
              f"{config.max_response_seconds:g} s (--max-response-seconds to change)")
    sys.stdout.flush()
    app = create_app(config)
    return run_server(app, host=args.host, port=args.port, log_level=args.log_level)

"""Finding scoring-model weights: a local directory, the Hugging Face cache, or the hub when it can be reached."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse


class ScoringModelUnavailable(RuntimeError):
    """A scoring model's weights cannot be loaded here (not cached, hub unreachable, package missing)."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub's endpoint, so that offline machines fall back in seconds, not after the
    hub client's retries (about 50 s per model)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def load_pretrained(loader, name: str, **kw):
    """``loader.from_pretrained(name)`` from a local directory, else the cache, else the hub if reachable."""
    if Path(name).is_dir():
        return loader.from_pretrained(name, **kw)
    try:
        return loader.from_pretrained(name, local_files_only=True, **kw)
    except OSError:
        pass
    if not hub_reachable():
        raise ScoringModelUnavailable(f"{name}: not in the Hugging Face cache and the hub cannot be reached")
    try:
        return loader.from_pretrained(name, **kw)
    except OSError as e:
        raise ScoringModelUnavailable(f"{name}: {e}") from e


def warn(message: str) -> None:
    print(f"openchroma eval: {message}", file=sys.stderr)

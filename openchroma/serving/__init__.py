"""The server: OpenAI-compatible Realtime / chat / speech APIs, a voice library and a browser client.

Import ``openchroma.serving.app`` for the app itself (it needs the ``serve`` extras); this package's
top level stays light so the CLI can describe the server without importing FastAPI.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """``$OPENCHROMA_DATA_DIR``, else ``$XDG_DATA_HOME/openchroma``, else ``~/.local/share/openchroma``."""
    if os.environ.get("OPENCHROMA_DATA_DIR"):
        return Path(os.environ["OPENCHROMA_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "openchroma"

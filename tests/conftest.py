from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("OPENCHROMA_FIXTURE", ROOT.parent / "shared" / "fixtures" / "chroma-tiny"))
CASES = ["speech_turn", "text_turn", "long_prompt", "forced_text"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE / "model.safetensors").is_file():
        pytest.skip(f"reference fixture not found at {FIXTURE}")
    return FIXTURE


@pytest.fixture(scope="session")
def tiny_model(fixture_dir):
    from openchroma.loading import load

    return load(fixture_dir, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory) -> Path:
    """A random-weight 'tiny' checkpoint with a tokenizer, written by init-random."""
    from openchroma.tools.init_random import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("tiny-random"), seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_chroma(tiny_random_dir):
    """The random 'tiny' checkpoint loaded once for the whole session (servers build fresh engines over it)."""
    from openchroma.pipeline import Chroma

    return Chroma.from_pretrained(tiny_random_dir, device="cpu", progress=False)

"""Load a Chroma checkpoint (local directory or Hugging Face hub id) into our modules.

The model is built on the ``meta`` device (no memory, no random init); tensors stream one at a time from
safetensors to the target device and dtype and are assigned to it (``load_state_dict(assign=True)``), so
loading the 4B model in bfloat16 never holds a float32 copy of it. Derived buffers (rotary tables, the
Codec's lookup tables) are then computed on the device.
Anything that does not fit the model (missing or unexpected keys, wrong shapes, absent or truncated
files, a config that is not Chroma's) is an error naming the file and the key.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import quantization
from .config import ChromaConfig, ConfigError
from .models.chroma import ChromaModel

SKIPPED_PREFIXES = ("thinker.visual.",)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded as it is; the message names the file and key."""


@dataclass
class LoadedModel:
    model: ChromaModel
    config: ChromaConfig
    path: Path
    device: torch.device
    dtype: torch.dtype
    quantize: str | None = None                                  # the weight scheme, None for float weights
    unquantized: list[str] = field(default_factory=list)     # layers the scheme left in the load dtype, and why

    @property
    def num_parameters(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total


def resolve_checkpoint(model: str | os.PathLike, revision: str | None = None, progress: bool = True) -> Path:
    """A local directory as it is, else a hub repo id downloaded (with progress bars) into the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists():
        raise CheckpointError(f"{path}: not a directory (give the checkpoint directory, not a file)")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such checkpoint directory (and not a hub repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if progress else disable_progress_bars)()
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo: say which and why
        raise CheckpointError(
            f"{name}: could not download from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass a local checkpoint directory, or check the repo id, your network and HF_TOKEN."
        ) from e


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it, through the index when sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {k: path / v for k, v in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    try:
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{single}: unreadable safetensors file ({e})") from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class TensorFile:
    """Reads one safetensors file tensor by tensor with plain reads into torch's own (64-byte aligned) memory.

    Not through a memory map: the pages of a mapped file count in the process's resident memory until it is
    unmapped, so a mapped checkpoint costs its whole size again while it loads. Aligned memory matters too:
    CPU matmul kernels sum in another order (other low bits) on misaligned buffers."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with path.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header, self.start, self.size = header, 8 + n, size

    def shape(self, key: str) -> list[int]:
        return list(self.header[key]["shape"])

    def read_checked(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """:meth:`read`, and an error if a float tensor holds NaN or infinite values."""
        t = self.read(key, start, stop)
        if t.is_floating_point() and not _all_finite(t):
            raise CheckpointError(f"{self.path}: tensor {key!r} holds NaN or infinite values")
        return t

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``key``, or its rows ``start:stop`` (along the first dimension)."""
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        shape = list(entry["shape"])
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, which torch cannot hold")
        whole = torch.Size(shape).numel() * dtype.itemsize
        if end - begin != whole or self.start + end > self.size:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} (truncated or corrupt: "
                                  f"bytes {begin}..{end} of a {self.size - self.start}-byte data section)")
        if start is not None:
            row = whole // max(1, shape[0])
            begin, shape[0] = begin + start * row, stop - start
        out = torch.empty(shape, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes:
            with self.path.open("rb", buffering=0) as fh:
                fh.seek(self.start + begin)
                view = memoryview(out.view(-1).view(torch.uint8).numpy())
                got = 0
                while got < nbytes:
                    k = fh.readinto(view[got:])
                    if not k:
                        raise CheckpointError(f"{self.path}: cannot read tensor {key!r} (truncated)")
                    got += k
        return out


def _all_finite(t: torch.Tensor) -> bool:
    """Checked in blocks: ``isfinite`` on a whole table holds temporaries several times its size."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(b.float() if b.element_size() == 1 else b).all()) for b in flat.split(1 << 22))


def build_model(config: ChromaConfig) -> ChromaModel:
    """The model's structure on the ``meta`` device: no memory, no initialisation; weights come from the file."""
    with torch.device("meta"):
        return ChromaModel(config)


def _target_tensors(model: ChromaModel) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint must provide, by its published name (ties listed once)."""
    return dict(model.state_dict(keep_vars=True))


def _tied_aliases(config: ChromaConfig) -> dict[str, str]:
    """Names a file may carry for a tensor it must store once: alias -> canonical name."""
    shared = "audio_embedding.embed_audio_tokens.weight"
    aliases = {f"backbone.{shared}": f"decoder.{shared}"}
    if config.tie_word_embeddings:
        aliases["thinker.lm_head.weight"] = "thinker.model.embed_tokens.weight"
    return aliases


def load(
    model: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    revision: str | None = None,
    progress: bool = True,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a Chroma checkpoint from a local directory or a hub repo id.

    ``device`` defaults to CUDA when available; ``dtype`` is float32, bfloat16 or float16 (or their names).
    ``quantize`` (``int8``, ``int4``, ``fp8``) quantizes the weights as they stream in, one layer at a time
    (:mod:`openchroma.quantization`); a pre-quantized checkpoint loads quantized without it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype)
    path = resolve_checkpoint(model, revision, progress)
    try:
        config = ChromaConfig.from_file(path / "config.json")
        saved = quantization.saved_scheme(config.raw)
    except (ConfigError, quantization.QuantizationError) as e:
        raise CheckpointError(str(e)) from None
    if quantize and saved and quantize != saved:
        raise CheckpointError(f"{path}: the checkpoint is quantized to {saved}; it cannot load as {quantize}")
    scheme = saved or quantize
    if scheme:
        quantization.check_device(scheme, device)
    files = checkpoint_files(path)
    net = build_model(config)
    targets = {k: list(t.shape) for k, t in _target_tensors(net).items()}
    if config.tie_word_embeddings:
        targets.pop("thinker.lm_head.weight", None)
    aliases = _tied_aliases(config)
    qplan = quantization.plan(net, scheme) if scheme else None
    assembler = None
    if qplan is not None:
        assembler = quantization.Assembler(qplan, bool(saved), device, dtype)
        if saved:  # the quantized layers' float tensors are replaced by their quantized ones
            for spec in qplan.layers.values():
                for k in spec.keys():
                    targets.pop(k, None)
            targets.update(assembler.expected_shapes())
    _check_keys(path, files, targets, aliases)

    state = _read_tensors(path, files, targets, aliases, assembler, device, dtype, progress)
    net.load_state_dict(state, strict=False, assign=True)  # keys were checked above, with clearer errors
    if assembler is not None:
        assembler.install(net)
    net.thinker.tie_weights()  # assign replaced embed_tokens' parameter; lm_head must follow it
    net.init_buffers(device)
    left = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if t.is_meta]
    if left:  # a bug, not a bad file: every tensor is either loaded or derived
        raise RuntimeError(f"not materialised after loading: {', '.join(left)}")
    net.eval()
    return LoadedModel(net, config, path, device, dtype, scheme, qplan.skipped if qplan else [])


def _read_tensors(path: Path, files: dict[str, Path], targets: dict[str, list[int]], aliases: dict[str, str],
                  assembler: quantization.Assembler | None, device: torch.device, dtype: torch.dtype,
                  progress: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, shape-checked, on ``device`` in ``dtype``; quantized layers go to
    ``assembler`` instead (one at a time)."""
    by_file: dict[Path, list[str]] = {}
    for k, f in files.items():
        if not k.startswith(SKIPPED_PREFIXES):
            by_file.setdefault(f, []).append(k)
    bar = tqdm(total=sum(len(v) for v in by_file.values()), desc=f"Loading {path.name}", unit="tensor",
               disable=not progress)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for f, keys in by_file.items():
            reader = TensorFile(f)
            for k in keys:
                shape = reader.shape(k)
                if shape != targets[aliases.get(k, k)]:
                    raise CheckpointError(f"{f}: tensor {k!r} has shape {shape}, the config implies "
                                          f"{targets[aliases.get(k, k)]}")
                if k in aliases:  # a tie's duplicate: the canonical copy is loaded
                    bar.update()
                    continue
                if assembler is not None and k in assembler.owner:
                    # Quantized (if float) and packed now, a block of rows at a time; no float copy is kept.
                    assembler.add(k, functools.partial(reader.read_checked, k), shape[0])
                    bar.update()
                    continue
                src = reader.read_checked(k)
                if src.is_floating_point() and (src.dtype != dtype or src.device != device):
                    state[k] = torch.empty(shape, dtype=dtype, device=device).copy_(src)
                else:
                    state[k] = src.to(device)
                bar.update()
    bar.close()
    return state


def _check_keys(path: Path, files: dict[str, Path], targets: dict[str, list[int]], aliases: dict[str, str]) -> None:
    unexpected = [k for k in files if k not in targets and k not in aliases and not k.startswith(SKIPPED_PREFIXES)]
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    missing = [k for k in targets if k not in files]
    if missing:
        where = sorted({str(f) for f in files.values()})
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from {', '.join(where)}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None

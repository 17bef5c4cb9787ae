"""``openchroma quantize``: write a pre-quantized checkpoint that loads quantized without ``--quantize``.

Built layer by layer: each tensor is read, quantized (if the scheme quantizes it) and kept in its stored form,
so the peak memory is about the output's own size plus one float layer. The output is ``model.safetensors``, a
``config.json`` recording the scheme, and the source's tokenizer and other small files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import quantization
from ..config import ChromaConfig, ConfigError
from ..loading import (
    INDEX_FILE,
    SINGLE_FILE,
    SKIPPED_PREFIXES,
    CheckpointError,
    TensorFile,
    _tied_aliases,
    build_model,
    checkpoint_files,
    resolve_checkpoint,
)


def quantize_checkpoint(model: str | Path, scheme: str, out: str | Path, progress: bool = True) -> Path:
    """Quantize checkpoint ``model`` (a directory or hub id) to ``scheme``; write it to ``out`` and return it."""
    src = resolve_checkpoint(model, progress=progress)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the output must not be the source checkpoint")
    raw = json.loads((src / "config.json").read_text())
    try:
        config = ChromaConfig.from_dict(raw, str(src / "config.json"))
        if quantization.saved_scheme(raw):
            raise CheckpointError(f"{src}: already quantized ({raw['quantization']['scheme']})")
    except (ConfigError, quantization.QuantizationError) as e:
        raise CheckpointError(str(e)) from None
    if scheme not in quantization.SCHEMES:
        raise quantization.QuantizationError(f"unknown scheme {scheme!r}")
    qplan = quantization.plan(build_model(config), scheme)
    owner = {k: spec for spec in qplan.layers.values() for k in spec.keys()}
    aliases = _tied_aliases(config)
    files = checkpoint_files(src)
    tensors: dict[str, torch.Tensor] = {}
    readers: dict[Path, TensorFile] = {}
    keys = [k for k in files if not k.startswith(SKIPPED_PREFIXES) and k not in aliases]
    with torch.no_grad():
        for k in tqdm(keys, desc=f"Quantizing to {scheme}", unit="tensor", disable=not progress):
            reader = readers.setdefault(files[k], TensorFile(files[k]))
            spec = owner.get(k)
            part = k[len(spec.name) + 1:] if spec else ""
            if spec is None:
                tensors[k] = reader.read_checked(k)
            elif part == "bias":
                tensors[k] = reader.read_checked(k).float()
            elif spec.kind == "heads":
                for name, q in quantization.to_canonical(spec, {"weight": reader.read_checked(k)}).items():
                    tensors[f"{spec.name}.{name}"] = q.contiguous()
            else:  # a block of rows at a time: the float weight is never whole in memory
                rows = reader.shape(k)[0]
                for name, q in quantization.quantize_rows(partial(reader.read_checked, k), rows, spec.scheme).items():
                    tensors[f"{spec.name}.{name}"] = q
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt", "quantization": scheme})
    (out / INDEX_FILE).unlink(missing_ok=True)
    raw["quantization"] = {"format": quantization.FORMAT, "scheme": scheme}
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for f in src.iterdir():  # tokenizer, chat template, generation config, README: everything but the weights
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX_FILE):
            shutil.copy2(f, out / f.name)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or Hugging Face hub repo id")
    parser.add_argument("--quantize", required=True, choices=quantization.SCHEMES,
                        help="int8 or int4 (any device), fp8 (CUDA, compute capability 8.9+)")
    parser.add_argument("--out", required=True, help="directory to write the pre-quantized checkpoint to")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import resource

    out = quantize_checkpoint(args.model, args.quantize, args.out, progress=not args.quiet)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"wrote {args.quantize} checkpoint to {out}: {size / 2**20:.1f} MiB of weights "
          f"(peak memory {peak / 2**20:.0f} MiB); it loads quantized without --quantize")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openchroma quantize", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (CheckpointError, quantization.QuantizationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

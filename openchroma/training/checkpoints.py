"""Training checkpoints (the trained tensors, optimizer, scheduler and random state, for an exact resume) and
the result: a checkpoint in the published layout with the trained tensors swapped in."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..loading import INDEX_FILE, SINGLE_FILE, checkpoint_files
from ..models.chroma import ChromaModel

STATE_FILE = "trainer_state.json"


def _trainable_state(model: ChromaModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def gather_trainable(model: ChromaModel, trainee: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The trained tensors by name; with FSDP a collective (every process calls it, the first gets them)."""
    if not fsdp:
        return _trainable_state(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in gather_model_state(trainee).items() if k in names}


def gather_model_state(trainee: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) state dict of an FSDP-sharded trainee on the first process, published names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainee, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v.contiguous() for k, v in full.items()}


def optimizer_state(trainee: nn.Module, opt, fsdp: bool) -> dict:
    if not fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(trainee, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training_checkpoint(out: Path, step: int, weights: dict[str, torch.Tensor], opt_state: dict, sched,
                             cfg: Any) -> Path:
    ck = out / "checkpoints" / f"step-{step:07d}"
    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt_state, "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "config": config_dict(cfg)}, indent=1))
    shutil.rmtree(ck, ignore_errors=True)
    tmp.replace(ck)
    kept = sorted((out / "checkpoints").glob("step-???????"))
    for old in kept[:-max(1, cfg.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return ck


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-???????") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def config_dict(cfg: Any) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


WEIGHT_SUFFIXES = (".safetensors",)


def write_checkpoint(base: Path, state: dict[str, torch.Tensor], out: Path, trained_prefixes: tuple[str, ...]) -> None:
    """``out`` = ``base`` with every tensor under ``trained_prefixes`` replaced by ``state``'s (same files,
    same names, same ties and index), plus the base's tokenizer and other files; a complete config."""
    from ..tools.init_random import complete_config

    out.mkdir(parents=True, exist_ok=True)
    files = checkpoint_files(base)
    for file in sorted(set(files.values())):
        tensors = {}
        with safe_open(str(file), "pt", device="cpu") as f:
            meta = f.metadata()
            for k in f.keys():
                t = f.get_tensor(k)
                if k.startswith(trained_prefixes) and k in state:
                    t = state[k].detach().to(device="cpu", dtype=t.dtype).contiguous()
                tensors[k] = t
        save_file(tensors, str(out / file.name), metadata=meta or {"format": "pt"})
    for extra in base.iterdir():
        if extra.is_file() and not extra.name.endswith(WEIGHT_SUFFIXES) and extra.name not in (
                "config.json", "README.md") and not (out / extra.name).exists():
            shutil.copy2(extra, out / extra.name)
    if (base / INDEX_FILE).is_file():
        shutil.copy2(base / INDEX_FILE, out / INDEX_FILE)
    else:
        (out / INDEX_FILE).unlink(missing_ok=True)
    assert (out / SINGLE_FILE).is_file() or (out / INDEX_FILE).is_file()
    config = json.loads((base / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(complete_config(config), indent=2))




def restore_checkpoint(ck: Path, trainee: nn.Module, model: ChromaModel, opt, sched, trainable: list[str],
                       fsdp: bool, device: torch.device) -> int:
    """Load training checkpoint ``ck`` into the model, optimizer, scheduler and random generators; its step."""
    from safetensors.torch import load_file

    state = json.loads((ck / STATE_FILE).read_text())
    weights = load_file(str(ck / "trainable.safetensors"))
    missing = set(trainable) - set(weights)
    if missing:
        raise ValueError(f"{ck}: checkpoint lacks {sorted(missing)[0]!r}: it was made with other --lora/--train "
                         "settings (use another --out or --no-resume)")
    extra = torch.load(ck / "optimizer.pt", weights_only=False)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(trainee, {f"model.{k}": v.to(device) for k, v in weights.items()}, options=full)
        set_optimizer_state_dict(trainee, opt, extra["optimizer"], options=full)
    else:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in weights.items():
                named[k].copy_(v)
        opt.load_state_dict(extra["optimizer"])
    sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    random.setstate(extra["python_rng"])
    return int(state["step"])

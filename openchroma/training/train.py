"""``openchroma train``: fine-tune the Backbone and Decoder on prepared data, the Reasoner frozen.

The Reasoner is a feature extractor: its hidden states and token ids come precomputed from ``prepare`` and
its token embeddings (the table text enters the Backbone through) stay frozen, so training holds only the
Reasoner's ``embed_tokens`` and drops its layers and audio tower from memory. The Backbone learns codebook 0
over the teacher-forced inference sequence (:mod:`.sequence`); the Decoder learns codebooks 1..7 inside each
frame. LoRA (``peft``) or full fine-tuning; AdamW, warm-up then cosine decay, gradient accumulation,
gradient checkpointing, bf16 autocast on CUDA, optional decoder amortisation; data-parallel under
``torchrun`` (gloo on CPU, NCCL on CUDA). Batches are a deterministic function of the seed and the step, so
resuming from a checkpoint continues exactly as an uninterrupted run.

The output directory ends up a complete checkpoint in the published layout (LoRA merged), loadable by
``openchroma.load`` / ``serve``; ``metrics.jsonl`` (and TensorBoard logs in ``tb/``) and ``checkpoints/``
sit beside the weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..loading import LoadedModel, load
from ..models.chroma import ChromaModel
from .checkpoints import (
    config_dict,
    gather_model_state,
    gather_trainable,
    latest_checkpoint,
    optimizer_state,
    restore_checkpoint,
    save_training_checkpoint,
    write_checkpoint,
)
from .data import PREPARED_INDEX, PreparedDataset
from .sequence import ResponseExample, enable_checkpointing, eos_frame, teacher_forced

TRAINABLE_PARTS = ("backbone", "decoder")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Everything ``openchroma train`` takes (see ``openchroma train --help``)."""

    model: str
    data: str
    out: str
    steps: int = 1000
    lr: float = 1e-4
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    train: tuple[str, ...] = TRAINABLE_PARTS
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    save_adapter: bool = False
    decoder_fraction: float = 1.0
    decoder_loss_weight: float = 1.0
    holdout: int = 0
    eval_every: int = 0
    log_every: int = 1
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    bf16: bool = True
    gradient_checkpointing: bool = False
    fsdp: bool = False
    tensorboard: bool = True
    progress: bool = True
    stop_after: int | None = None

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("--batch-size and --grad-accum must be >= 1")
        bad = [p for p in self.train if p not in TRAINABLE_PARTS]
        if bad or not self.train:
            raise ValueError(f"--train takes a comma-separated subset of {','.join(TRAINABLE_PARTS)}, got "
                             f"{','.join(self.train) or 'nothing'}")
        if not 0 < self.decoder_fraction <= 1:
            raise ValueError(f"--decoder-fraction must be in (0, 1], got {self.decoder_fraction}")
        if self.fsdp and self.lora:
            raise ValueError("--fsdp shards full fine-tuning; LoRA trains few weights: leave --fsdp out (DDP)")
        if self.warmup < 0 or self.warmup >= self.steps and self.warmup:
            raise ValueError(f"--warmup must be in [0, --steps), got {self.warmup}")


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the ``torchrun`` process group when launched by it (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        dev = torch.device("cuda", local if world > 1 else (torch.device(want).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(want)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local), dev


# ----------------------------------------------------------------------------------------------------------
# What is trained
# ----------------------------------------------------------------------------------------------------------

def drop_reasoner(model: ChromaModel) -> None:
    """Free the reasoner's layers and audio tower, and the codec: training reads precomputed features and codes
    and only needs the reasoner's token embedding table (frozen). The saved checkpoint takes those tensors
    from the base files."""
    model.thinker.model.layers = nn.ModuleList()
    model.thinker.audio_tower = nn.Module()
    model.codec_model = nn.Module()


def lora_target_regex(parts: tuple[str, ...], targets: tuple[str, ...]) -> str:
    return rf"^({'|'.join(parts)})\.model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(targets)})$"


def setup_trainable(model: ChromaModel, cfg: TrainConfig) -> list[str]:
    """Freeze everything, then open the trained part (full) or inject LoRA adapters; returns trainable names."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.lora:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ValueError("--lora needs the peft library: pip install 'openchroma[train]'") from None

        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_target_regex(cfg.train, cfg.lora_targets), bias="none")
        inject_adapter_in_model(lcfg, model)
        model._openchroma_lora_config = lcfg
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        for name, p in model.named_parameters():
            part = name.split(".", 1)[0]
            shared_audio = name.startswith("decoder.audio_embedding.")  # the backbone's A(frame) table too
            p.requires_grad_(part in cfg.train or shared_audio)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"nothing to train: no LoRA target among {', '.join(cfg.lora_targets)} in "
                         f"{', '.join(cfg.train)}")
    return names


def merge_lora(model: ChromaModel) -> None:
    """Fold every LoRA adapter into its base weight and put the plain layers back (published names)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())


def save_adapter(model: ChromaModel, out: Path) -> None:
    from peft import get_peft_model_state_dict

    out.mkdir(parents=True, exist_ok=True)
    lcfg = model._openchroma_lora_config
    save_file({k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    lcfg.save_pretrained(str(out))


# ----------------------------------------------------------------------------------------------------------
# Batches and loss
# ----------------------------------------------------------------------------------------------------------

def split_holdout(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    if holdout >= n:
        raise ValueError(f"--holdout {holdout} leaves no training example (the data has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(order[holdout:]), sorted(order[:holdout])


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())


def step_examples(train_ids: list[int], step: int, batch: int, seed: int) -> list[int]:
    """The global batch of optimizer step ``step`` (0-based): consecutive slices of seeded epoch permutations."""
    n = len(train_ids)
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(k, n)
        out.append(train_ids[_epoch_order(n, seed, epoch)[pos]])
    return out


def decoder_subset(frames: list[int], fraction: float, seed: int, step: int, slot: int) -> list[torch.Tensor]:
    """Per example, the frames the Decoder trains on (all, or a seeded random ``fraction``: amortisation)."""
    if fraction >= 1:
        return [torch.arange(n) for n in frames]
    out = []
    for i, n in enumerate(frames):
        g = torch.Generator().manual_seed(hash((seed, step, slot + i)) % (2**62))
        k = max(1, math.ceil(fraction * n))
        out.append(torch.randperm(n, generator=g)[:k].sort().values)
    return out


class Trainee(nn.Module):
    """The model with a ``forward`` that returns summed losses, so DDP can wrap it."""

    def __init__(self, model: ChromaModel):
        super().__init__()
        self.model = model

    def forward(self, examples: list[ResponseExample], decoder_frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = teacher_forced(self.model, examples, decoder_frames)
        size = self.model.cfg.codebook_size
        c0 = out.c0.float()
        c0 = c0.masked_fill(torch.arange(c0.shape[-1], device=c0.device) >= size, float("-inf"))
        rest = out.rest.float()
        rest = rest.masked_fill(torch.arange(rest.shape[-1], device=rest.device) >= size, float("-inf"))
        sum_c0 = F.cross_entropy(c0, out.codes[:, 0], reduction="sum")
        targets = out.codes[out.decoder_frames][:, 1:]
        sum_rest = F.cross_entropy(rest.reshape(-1, rest.shape[-1]), targets.reshape(-1), reduction="sum")
        return sum_c0, sum_rest


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        span = max(1, cfg.steps - cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------

def _resolve_data(cfg: TrainConfig, lm: LoadedModel, d: Dist) -> Path:
    data = Path(cfg.data)
    if data.is_dir() and (data / PREPARED_INDEX).is_file():
        return data
    if data.is_file():
        from .prepare import prepare

        prepared = Path(cfg.out) / "prepared"
        if d.main:
            prepare(lm, data, prepared, progress=cfg.progress)
        d.barrier()
        return prepared
    raise ValueError(f"--data {data}: neither a manifest (.jsonl) nor a prepared directory")


@dataclass
class _Run:
    """What the training loop works with, once set up."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    out: Path
    lm: LoadedModel
    ds: PreparedDataset
    trainee: Trainee
    wrapped: nn.Module
    params: list[nn.Parameter]
    trainable: list[str]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    per_micro: int

    @property
    def model(self) -> ChromaModel:
        return self.lm.model


def _setup(cfg: TrainConfig) -> _Run:
    """Processes, the model (reasoner dropped, trained parts on the device, wrapped for DDP/FSDP), the prepared
    data, the optimizer and its schedule."""
    d, device = init_distributed(cfg.device)
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()
    per_micro = cfg.batch_size // (d.world * cfg.grad_accum)
    if per_micro * d.world * cfg.grad_accum != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum "
                         f"({d.world} x {cfg.grad_accum})")
    # Load on the CPU: the reasoner's layers are only needed to prepare a manifest, then leave before the
    # trained parts move to the device (the 3B reasoner never occupies GPU memory with prepared data).
    needs_prepare = not (Path(cfg.data) / PREPARED_INDEX).is_file()
    lm = load(cfg.model, device=device if needs_prepare else "cpu", dtype=cfg.dtype,
              progress=cfg.progress and d.main)
    model = lm.model
    data_dir = _resolve_data(cfg, lm, d)
    ds = PreparedDataset(data_dir)
    if ds.hidden_size != lm.config.reasoner.hidden_size:
        raise ValueError(f"{data_dir}: prepared with a reasoner of hidden size {ds.hidden_size}, the model's is "
                         f"{lm.config.reasoner.hidden_size} (prepare again with this --model)")
    drop_reasoner(model)
    model.to(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    trainable = setup_trainable(model, cfg)
    model.train()
    if cfg.gradient_checkpointing:
        for part in cfg.train:
            enable_checkpointing(getattr(model, part).model)
    trainee = Trainee(model)
    wrapped = _wrap(trainee, model, cfg, d)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return _Run(cfg, d, device, out, lm, ds, trainee, wrapped, params, trainable, opt, sched, per_micro)


def _wrap(trainee: Trainee, model: ChromaModel, cfg: TrainConfig, d: Dist) -> nn.Module:
    """The trainee sharded by FSDP2, replicated by DDP, or as it is in one process."""
    if cfg.fsdp:
        if d.world < 2:
            raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N (N > 1)")
        from torch.distributed.fsdp import fully_shard

        # FSDP2: each transformer layer of the trained parts is a unit, the rest (heads, embeddings) the root.
        for part in cfg.train:
            for layer in getattr(model, part).model.layers:
                fully_shard(layer)
        fully_shard(trainee)
        return trainee
    if d.world > 1:
        return nn.parallel.DistributedDataParallel(trainee)
    return trainee


def _step(r: _Run, step: int, train_ids: list[int], eos: torch.Tensor, autocast) -> dict:
    """One optimizer step over the global batch of ``step`` (micro-batches, gradient sync, clipping); its
    losses, learning rate and gradient norm."""
    cfg, d, device = r.cfg, r.d, r.device
    batch = step_examples(train_ids, step, cfg.batch_size, cfg.seed)
    frames = [r.ds.frames(i) for i in batch]
    subsets = decoder_subset(frames, cfg.decoder_fraction, cfg.seed, step, 0)
    n_c0 = sum(frames)
    n_rest = sum(len(s) for s in subsets) * (r.model.cfg.audio_num_codebooks - 1)
    r.opt.zero_grad(set_to_none=True)
    sums = [0.0, 0.0]
    for micro in range(cfg.grad_accum):
        lo = (micro * d.world + d.rank) * r.per_micro
        mine = list(range(lo, lo + r.per_micro))
        exs = [r.ds.example(batch[i], eos, device) for i in mine]
        sel = _rebase([frames[i] for i in mine], [subsets[i] for i in mine]).to(device)
        skip_sync = d.world > 1 and micro < cfg.grad_accum - 1
        if cfg.fsdp:
            r.trainee.set_requires_gradient_sync(not skip_sync)
        no_sync = r.wrapped.no_sync() if skip_sync and not cfg.fsdp else contextlib.nullcontext()
        with no_sync, autocast:
            sum_c0, sum_rest = r.wrapped(exs, sel)
            # Normalise by the global batch's counts; DDP averages gradients over processes, so scale back.
            loss = (sum_c0 / n_c0 + cfg.decoder_loss_weight * sum_rest / n_rest) * d.world
        loss.backward()
        sums[0] += float(sum_c0.detach())
        sums[1] += float(sum_rest.detach())
    grad_norm = float("nan")
    if cfg.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(r.params, cfg.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    lr = r.sched.get_last_lr()[0]
    r.opt.step()
    r.sched.step()
    sums = d.all_sum(sums, device if device.type == "cuda" else torch.device("cpu"))
    loss_c0, loss_rest = sums[0] / n_c0, sums[1] / n_rest
    return {"step": step + 1, "loss": loss_c0 + cfg.decoder_loss_weight * loss_rest, "loss_c0": loss_c0,
            "loss_c1_7": loss_rest, "lr": lr, "grad_norm": grad_norm, "frames": n_c0}


def _log_record(record: dict, metrics_path: Path, writer, cfg: TrainConfig) -> None:
    done = record["step"]
    if done % cfg.log_every == 0 or done == cfg.steps or "eval_loss" in record:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v == v:
                    writer.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k}", v, done)


def _save(r: _Run, step: int) -> None:
    """A training checkpoint at ``step`` (a collective under FSDP; the first process writes it)."""
    weights = gather_trainable(r.model, r.trainee, r.cfg.fsdp)
    opt_state = optimizer_state(r.trainee, r.opt, r.cfg.fsdp)
    if r.d.main:
        save_training_checkpoint(r.out, step, weights, opt_state, r.sched, r.cfg)


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Run training; returns a summary (final step, last losses, examples/s)."""
    cfg.check()
    r = _setup(cfg)
    d, device, out = r.d, r.device, r.out
    start = 0
    metrics_path = out / "metrics.jsonl"
    ck = latest_checkpoint(out) if cfg.resume else None
    if ck is not None:
        start = restore_checkpoint(ck, r.trainee, r.model, r.opt, r.sched, r.trainable, cfg.fsdp, device)
        if d.main:
            log(f"resuming from {ck} (step {start})")
    if d.main:
        _truncate_metrics(metrics_path, start)
        (out / "train_config.json").write_text(json.dumps(config_dict(cfg), indent=1))
    d.barrier()

    train_ids, eval_ids = split_holdout(len(r.ds), cfg.holdout, cfg.seed)
    eos = eos_frame(r.model, device)
    writer = _tensorboard(out / "tb", cfg) if d.main else None
    bar = tqdm(total=cfg.steps, initial=start, desc="Training", unit="step", disable=not (cfg.progress and d.main))
    summary: dict = {"step": start}
    t_start, cpu_start = time.perf_counter(), time.process_time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and cfg.bf16) \
        else contextlib.nullcontext()
    for step in range(start, cfg.steps):
        record = summary = _step(r, step, train_ids, eos, autocast)
        done = step + 1
        if cfg.eval_every and eval_ids and (done % cfg.eval_every == 0 or done == cfg.steps):
            record.update(evaluate(r.trainee, r.ds, eval_ids, eos, device, cfg))
        elapsed = time.perf_counter() - t_start
        record["examples_per_s"] = (done - start) * cfg.batch_size / elapsed if elapsed > 0 else None
        record["elapsed_s"] = elapsed
        record["cpu_s"] = time.process_time() - cpu_start  # this process's CPU time (for shared machines)
        if device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if d.main:
            _log_record(record, metrics_path, writer, cfg)
            bar.set_postfix(loss=f"{record['loss']:.3f}", c0=f"{record['loss_c0']:.3f}",
                            c1_7=f"{record['loss_c1_7']:.3f}")
            bar.update()
        stopping = cfg.stop_after is not None and done >= cfg.stop_after and done < cfg.steps
        if done < cfg.steps and (stopping or cfg.save_every and done % cfg.save_every == 0):
            _save(r, done)
        d.barrier()
        if stopping:
            bar.close()
            if d.main:
                log(f"stopped after step {done} as asked (--stop-after); run again with the same --out to resume")
            summary["stopped"] = True
            _finish(d)
            return summary
    bar.close()
    if writer is not None:
        writer.close()
    if start < cfg.steps:
        _save(r, cfg.steps)
    _write_result(r, summary)
    d.barrier()
    _finish(d)
    return summary


def _write_result(r: _Run, summary: dict) -> None:
    """The fine-tuned checkpoint in the published layout (LoRA merged; the adapter too if asked)."""
    final = gather_model_state(r.trainee) if r.cfg.fsdp else None
    if r.d.main:
        if r.cfg.lora:
            if r.cfg.save_adapter:
                save_adapter(r.model, r.out / "adapter")
            merge_lora(r.model)
        write_checkpoint(r.lm.path, final if final is not None else r.model.state_dict(), r.out,
                         tuple(f"{p}." for p in TRAINABLE_PARTS))
        summary["output"] = str(r.out)


def _finish(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _rebase(frames: list[int], subsets: list[torch.Tensor]) -> torch.Tensor:
    """Indices of the chosen decoder frames in the concatenation of these examples' frames."""
    out, base = [], 0
    for n, s in zip(frames, subsets, strict=True):
        out.append(s + base)
        base += n
    return torch.cat(out)


@torch.no_grad()
def evaluate(trainee: Trainee, ds: PreparedDataset, ids: list[int], eos: torch.Tensor, device: torch.device,
             cfg: TrainConfig) -> dict:
    """Held-out loss (all frames, all codebooks), computed the same way on every process."""
    was = trainee.training
    trainee.eval()
    s0 = s1 = n0 = n1 = 0.0
    for k in range(0, len(ids), max(1, cfg.batch_size)):
        chunk = ids[k:k + cfg.batch_size]
        exs = [ds.example(i, eos, device) for i in chunk]
        frames = sum(ex.codes.shape[0] for ex in exs)
        a, b = trainee(exs, torch.arange(frames, device=device))
        s0 += float(a)
        s1 += float(b)
        n0 += frames
        n1 += frames * (trainee.model.cfg.audio_num_codebooks - 1)
    trainee.train(was)
    return {"eval_loss": s0 / n0 + cfg.decoder_loss_weight * s1 / n1, "eval_loss_c0": s0 / n0,
            "eval_loss_c1_7": s1 / n1}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step (they will be written again)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


def _tensorboard(path: Path, cfg: TrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))

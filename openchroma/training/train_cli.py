"""``openchroma train``'s arguments and entry point (the training itself is ``training/train.py``)."""

from __future__ import annotations

import argparse
import json

from ..cli_args import add_model_arguments, csv


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Fine-tune Chroma as the paper trains it: the Reasoner frozen (its features "
                     "precomputed by `prepare`), the Backbone learning codebook 0 over the "
                     "inference sequence (voice prompt, then reasoner pairs and frames at 1:2), "
                     "the Decoder codebooks 1-7 within each frame. --data is a manifest (prepared "
                     "into OUT/prepared first) or a `prepare` directory. OUT receives a complete "
                     "checkpoint in the published layout (LoRA merged), metrics.jsonl, TensorBoard "
                     "logs (tb/) and checkpoints/ (with optimizer state; a rerun with the same "
                     "OUT resumes exactly). Many processes: `torchrun --nproc-per-node N -m "
                     "openchroma train ...` (data-parallel: NCCL on GPUs, gloo on CPU); "
                     "--batch-size is the global batch.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="manifest (.jsonl) or directory written by `openchroma prepare`")
    p.add_argument("--out", required=True, help="output directory (the fine-tuned checkpoint)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps, then cosine decay (default 0)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to lr x this (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off; default 1)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="examples per optimizer step over all processes (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--train", default="backbone,decoder",
                   help="parts to train: backbone, decoder or both, comma-separated (default both)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="linear layers of the trained parts that get adapters (default: all attention and MLP)")
    p.add_argument("--save-adapter", action="store_true", help="also write the LoRA adapter to OUT/adapter")
    p.add_argument("--decoder-fraction", type=float, default=1.0,
                   help="train the Decoder on this random fraction of frames (amortisation; default 1)")
    p.add_argument("--decoder-loss-weight", type=float, default=1.0,
                   help="loss = loss_c0 + this x loss_c1_7 (default 1)")
    p.add_argument("--holdout", type=int, default=0, help="examples held out for the eval loss (default 0)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (default 0 = off)")
    p.add_argument("--log-every", type=int, default=1, help="write metrics every N steps (default 1)")
    p.add_argument("--save-every", type=int, default=0,
                   help="training checkpoint every N steps (default 0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="training checkpoints kept (default 2)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after step N with a checkpoint, as if interrupted (run again to resume)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, LoRA init, amortisation (default 0)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, ~30%% slower)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard full fine-tuning's weights, gradients and optimizer state over the "
                        "processes (FSDP2) instead of replicating them (DDP): for models that do not fit one GPU")
    p.add_argument("--no-bf16", action="store_true", help="on CUDA, do not autocast to bfloat16")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model, data=args.data, out=args.out, steps=args.steps, lr=args.lr, warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size, grad_accum=args.grad_accum, train=csv(args.train), lora=args.lora,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=csv(args.lora_targets), save_adapter=args.save_adapter, decoder_fraction=args.decoder_fraction,
        decoder_loss_weight=args.decoder_loss_weight, holdout=args.holdout, eval_every=args.eval_every,
        log_every=args.log_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        resume=not args.no_resume, seed=args.seed, device=args.device, dtype=args.dtype, bf16=not args.no_bf16,
        gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp, tensorboard=not args.no_tensorboard,
        progress=not args.no_progress, stop_after=args.stop_after)
    summary = train(cfg)
    if summary.get("output"):
        print(json.dumps(summary))
    return 0

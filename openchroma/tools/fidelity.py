"""``openchroma fidelity``: how close a quantized (or lower-precision) model's logits stay to float32's.

Greedy outputs stop matching exactly once weights are rounded, so the comparison is teacher-forced: every
case's expected text tokens and codes go through both models step by step (the Reasoner's prefill and its
steps, the Backbone on the 1:2 schedule, the Decoder's seven passes), and the logits each model gives at every
step are compared: top-1 agreement and mean KL(float32 || model) for text, codebook 0 and codebooks 1-7, and the
relative error of all logits together. bfloat16 weights are measured beside, as the yardstick.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import quantization
from ..cli_args import add_quantize_argument
from ..loading import CheckpointError, LoadedModel, load
from ..voice import VoicePrompt, encode_voice
from .conformance import CaseError, load_case

KEYS = ("text_top1", "c0_top1", "c1_7_top1", "text_kl", "c0_kl", "c1_7_kl", "logit_rel_err")


@torch.inference_mode()
def forced_logits(lm: LoadedModel, case: dict[str, torch.Tensor], voice: VoicePrompt) -> dict[str, torch.Tensor]:
    """Logits (float32, CPU) of one case run teacher-forced: ``text`` ``[T, V]``, ``c0`` ``[F, V]``, ``c1_7``
    ``[F, 7, V]`` (codes limited to the codec's codebook)."""
    m, cfg, dev, dt = lm.model, lm.config, lm.device, lm.dtype
    tokens = case["expected_text_tokens"].tolist()
    codes = case["expected_codes"].to(dev)
    cb = cfg.codebook_size
    ids = case["thinker_input_ids"].reshape(1, -1).to(dev)
    feats = case.get("input_features")
    embeds = None
    if feats is not None:
        embeds = m.thinker.audio_tower(feats.reshape(feats.shape[-2], feats.shape[-1]).to(dev, dt))
    n = ids.shape[1]
    tcache = m.thinker.model.new_cache(1, n + len(tokens) + 1)
    h = m.thinker.model(m.thinker.embed(ids, embeds), torch.arange(n, device=dev)[None], tcache, kv_len=n)[:, -1]
    text = [m.reasoner_logits(h)]
    pos, used = n, 1
    voice_x = m.voice_prompt_embeds(voice.text_ids.to(dev), voice.codes.to(dev)).to(dt)
    first = torch.cat([voice_x, h.to(dt), m.text_embedding(torch.tensor([tokens[0]], device=dev))])
    bcache = m.backbone.model.new_cache(1, first.shape[0] + 3 * codes.shape[0])
    dcache = m.decoder.model.new_cache(1, cfg.audio_num_codebooks)
    bpos = 0

    def backbone(x: torch.Tensor) -> torch.Tensor:
        nonlocal bpos
        p = torch.arange(bpos, bpos + x.shape[0], device=dev)[None]
        bpos += x.shape[0]
        return m.backbone.model(x[None], p, bcache, kv_len=bpos)[:, -1]

    hidden = backbone(first)
    c0, rest = [], []
    text_done = tokens[0] == cfg.im_end_token_id
    for step in range(codes.shape[0]):
        if step > 0:
            x = [m.frame_embedding(codes[step - 1])[None]]
            if step % 2 == 0 and not text_done and used < len(tokens):
                e = m.thinker.model.embed_tokens(torch.tensor([[tokens[used - 1]]], device=dev))
                h = m.thinker.model(e, torch.tensor([[pos]], device=dev), tcache, kv_len=pos + 1)[:, -1]
                pos += 1
                text.append(m.reasoner_logits(h))
                x += [h.to(dt), m.text_embedding(torch.tensor([tokens[used]], device=dev))]
                text_done = tokens[used] == cfg.im_end_token_id
                used += 1
            hidden = backbone(torch.cat(x))
        c0.append(m.codebook0_logits(hidden)[..., :cb])
        frame: list[torch.Tensor] = []

        def forced(logits: torch.Tensor, i: int, frame=frame, step=step) -> torch.Tensor:
            frame.append(logits[..., :cb])
            return codes[step, i].reshape(1)

        m.decode_frame(hidden, codes[step, :1], dcache, forced)
        rest.append(torch.cat(frame))
    return {"text": torch.cat(text).float().cpu(), "c0": torch.cat(c0).float().cpu(),
            "c1_7": torch.stack(rest).float().cpu()}


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement, mean KL(ref || got) per group, and ``|got - ref| / |ref|`` over all logits."""
    out: dict[str, float] = {}
    for name, key in (("text", "text"), ("c0", "c0"), ("c1_7", "c1_7")):
        r, g = ref[key].flatten(0, -2), got[key].flatten(0, -2)
        n = min(len(r), len(g))
        r, g = r[:n], g[:n]
        out[f"{name}_top1"] = (r.argmax(-1) == g.argmax(-1)).float().mean().item()
        lr, lg = F.log_softmax(r, -1), F.log_softmax(g, -1)
        out[f"{name}_kl"] = max(0.0, (lr.exp() * (lr - lg)).sum(-1).mean().item())  # not below 0 by rounding
    num = sum(((got[k][: len(ref[k])] - ref[k][: len(got[k])]) ** 2).sum() for k in ref)
    den = sum((ref[k] ** 2).sum() for k in ref)
    out["logit_rel_err"] = (num / den).sqrt().item()
    return out


def _case_logits(lm: LoadedModel, cases: list[dict], voices: list[VoicePrompt]) -> list[dict[str, torch.Tensor]]:
    return [forced_logits(lm, c, v) for c, v in zip(cases, voices, strict=True)]


def measure(
    model: str, cases: list[str | Path], quantize: str | None = None, dtype: str = "float32",
    device: str | None = None, reference: str | None = None, yardstick: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """One result per case: ``model`` (quantized with ``quantize``, in ``dtype``) against ``reference`` (default
    ``model``) in float32, with bfloat16's figures under ``"bf16"`` when ``yardstick``."""
    loaded = [load_case(c) for c in cases]
    reference = reference or model
    log(f"float32 reference: {reference}")
    ref = load(reference, device=device, dtype="float32", progress=False)
    voices = [_voice(ref, c) for c in loaded]
    ref_logits = _case_logits(ref, loaded, voices)
    del ref
    gc.collect()
    bf16 = None
    if yardstick:
        log("bfloat16 yardstick")
        lm = load(reference, device=device, dtype="bfloat16", progress=False)
        bf16 = [compare(r, g) for r, g in zip(ref_logits, _case_logits(lm, loaded, voices), strict=True)]
        del lm
        gc.collect()
    log(f"measured: {model} ({quantize or 'no quantization'}, {dtype})")
    lm = load(model, device=device, dtype=dtype, quantize=quantize, progress=False)
    scheme = lm.quantize
    got = _case_logits(lm, loaded, voices)
    results = []
    for i, (path, r, g) in enumerate(zip(cases, ref_logits, got, strict=True)):
        row = {"case": str(path), "quantize": scheme, "dtype": dtype, **compare(r, g)}
        if bf16 is not None:
            row["bf16"] = bf16[i]
        results.append(row)
    return results


def _voice(lm: LoadedModel, case: dict[str, torch.Tensor]) -> VoicePrompt:
    """The case's own voice codes, else the reference model's encoding (shared by every model compared)."""
    if "prompt_codes" in case:
        return VoicePrompt(case["prompt_text_ids"].reshape(-1), case["prompt_codes"])
    return encode_voice(lm.model, case["prompt_audio"].float(), case["prompt_text_ids"])


def table(results: list[dict]) -> str:
    cols = ("text top-1", "c0 top-1", "c1-7 top-1", "text KL", "c0 KL", "c1-7 KL", "logit rel err")
    lines = ["| case | weights | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]

    def row(name: str, label: str, r: dict) -> str:
        return f"| {name} | {label} | " + " | ".join(
            f"{r[k]:.4f}" if k.endswith("top1") else f"{r[k]:.3g}" for k in KEYS) + " |"

    for r in results:
        name = Path(r["case"]).stem.removeprefix("case_")
        lines.append(row(name, f"{r['quantize'] or 'none'} ({r['dtype']})", r))
        if "bf16" in r:
            lines.append(row(name, "bf16 (yardstick)", r["bf16"]))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or hub repo id (may be pre-quantized)")
    add_quantize_argument(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the measured model's dtype (default float32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--case", nargs="+", required=True, help="reference case files (case_*.safetensors)")
    parser.add_argument("--reference", default=None,
                        help="float checkpoint to compare against (default: --model; needed when --model is a "
                             "pre-quantized checkpoint)")
    parser.add_argument("--no-yardstick", dest="yardstick", action="store_false",
                        help="skip bfloat16's figures (one model load fewer)")
    parser.add_argument("--json", action="store_true", help="one JSON object per case")


def run(args: argparse.Namespace) -> int:
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    results = measure(args.model, args.case, quantize=args.quantize, dtype=args.dtype, device=args.device,
                      reference=args.reference, yardstick=args.yardstick, log=log)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openchroma fidelity", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (CheckpointError, CaseError, quantization.QuantizationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Run a reference case (``case_*.safetensors``) and compare with what it expects.

Users run this to check a converted or quantized checkpoint; the test suite runs it on every case.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..cli_args import add_compile_argument, add_model_arguments
from ..engine.generate import ResponseRunner
from ..loading import LoadedModel
from ..voice import VoicePrompt, encode_voice

REQUIRED = ("thinker_input_ids", "prompt_text_ids", "prompt_audio", "expected_codes", "expected_text_tokens",
            "expected_prefill_logits", "expected_audio")
TOLERANCE = 1e-4


class CaseError(ValueError):
    """The case file is missing, unreadable or lacks a tensor."""


@dataclass
class ConformanceReport:
    case: str
    tokens_match: bool
    first_token_mismatch: int | None
    codes_match: bool
    first_code_mismatch: tuple[int, int] | None  # (frame, codebook)
    prompt_codes_match: bool | None
    prefill_logits_max_abs_diff: float
    audio_max_abs_diff: float
    audio_max_rel_diff: float
    n_frames: int
    expected_frames: int
    stop_reason: str

    @property
    def passed(self) -> bool:
        return (self.tokens_match and self.codes_match and self.prefill_logits_max_abs_diff <= TOLERANCE
                and self.audio_max_rel_diff <= TOLERANCE and self.prompt_codes_match is not False)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        def mark(ok):
            return "ok" if ok else "MISMATCH"

        lines = [f"case {self.case}: {'PASS' if self.passed else 'FAIL'}",
                 f"  text tokens   {mark(self.tokens_match)}"
                 + (f" (first at index {self.first_token_mismatch})" if not self.tokens_match else ""),
                 f"  codes         {mark(self.codes_match)} ({self.n_frames}/{self.expected_frames} frames)"
                 + (f" (first at frame {self.first_code_mismatch[0]}, codebook {self.first_code_mismatch[1]})"
                    if self.first_code_mismatch else ""),
                 f"  prefill logits max abs diff {self.prefill_logits_max_abs_diff:.3g} (tolerance {TOLERANCE:g})",
                 f"  audio max abs diff {self.audio_max_abs_diff:.3g}, relative {self.audio_max_rel_diff:.3g}"]
        if self.prompt_codes_match is not None:
            lines.append(f"  voice prompt codes {mark(self.prompt_codes_match)}")
        return "\n".join(lines)


def load_case(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: no such case file")
    try:
        case = load_file(str(path))
    except Exception as e:
        raise CaseError(f"{path}: unreadable safetensors file ({e})") from None
    missing = [k for k in REQUIRED if k not in case]
    if missing:
        raise CaseError(f"{path}: missing tensor {missing[0]!r}")
    return case


def case_runner(lm: LoadedModel, paths: list[str | Path], compile: bool = False) -> ResponseRunner:
    """One engine slot sized for every case, so a compiled step serves them all."""
    cases = [load_case(p) for p in paths]
    prompt = max(c["thinker_input_ids"].numel() for c in cases)
    voice = max(c["prompt_text_ids"].numel() + _voice_frames(lm, c) + 3 for c in cases)
    frames = max(c["expected_codes"].shape[0] for c in cases)
    return ResponseRunner.for_call(lm.model, prompt, voice, frames, compile=compile)


def _voice_frames(lm: LoadedModel, case: dict[str, torch.Tensor]) -> int:
    if "prompt_codes" in case:
        return case["prompt_codes"].shape[0]
    return -(-case["prompt_audio"].numel() // lm.config.audio_frame_freq)


def run_case(lm: LoadedModel, path: str | Path, runner: ResponseRunner | None = None) -> ConformanceReport:
    """Run one case through the engine's stepper (``runner``: a shared one-slot stepper; a fresh one if None)."""
    case = load_case(path)
    model = lm.model
    dev = lm.device
    exp_codes = case["expected_codes"]
    exp_tokens = case["expected_text_tokens"].tolist()
    # The voice prompt from the audio, as a user would give it; the case's own codes are checked too.
    voice = encode_voice(model, case["prompt_audio"].float(), case["prompt_text_ids"])
    prompt_codes_match = None
    if "prompt_codes" in case:
        pc = case["prompt_codes"]
        prompt_codes_match = voice.codes.shape == pc.shape and bool((voice.codes == pc).all())
        voice = VoicePrompt(voice.text_ids, pc)
    feats = case.get("input_features")
    if feats is not None:
        feats = feats.reshape(feats.shape[-2], feats.shape[-1]).to(dev, lm.dtype)
    forced = case.get("forced_text_tokens")
    runner = runner or case_runner(lm, [path])
    result = runner.run(case["thinker_input_ids"], voice, feats, max_new_frames=exp_codes.shape[0],
                        forced_text_tokens=None if forced is None else forced.tolist())

    got_tokens = result.text_tokens
    first_tok = next((i for i, (a, b) in enumerate(zip(got_tokens, exp_tokens, strict=False)) if a != b), None)
    if first_tok is None and len(got_tokens) != len(exp_tokens):
        first_tok = min(len(got_tokens), len(exp_tokens))
    codes = result.codes
    n = min(len(codes), len(exp_codes))
    diff = (codes[:n] != exp_codes[:n]).nonzero()
    first_code = tuple(diff[0].tolist()) if len(diff) else ((n, 0) if len(codes) != len(exp_codes) else None)
    logit_diff = (result.prefill_logits.cpu() - case["expected_prefill_logits"].float()).abs().max().item()
    exp_audio = case["expected_audio"].float().reshape(-1)
    audio = result.audio.reshape(-1) if result.audio is not None else torch.zeros(0)
    if audio.shape == exp_audio.shape:
        audio_diff = (audio - exp_audio).abs().max().item()
    else:
        audio_diff = float("inf")
    scale = max(exp_audio.abs().max().item(), 1e-12)
    return ConformanceReport(
        case=str(path), tokens_match=first_tok is None, first_token_mismatch=first_tok,
        codes_match=first_code is None, first_code_mismatch=first_code, prompt_codes_match=prompt_codes_match,
        prefill_logits_max_abs_diff=logit_diff, audio_max_abs_diff=audio_diff,
        audio_max_rel_diff=audio_diff / scale, n_frames=len(codes), expected_frames=len(exp_codes),
        stop_reason=result.stop_reason,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Run reference cases (case_*.safetensors) and compare tokens, codes, logits and audio. "
                     "Exit status 0 only when everything matches.")
    add_model_arguments(p, quantize=True)
    p.add_argument("--case", required=True, action="append", help="case file (repeat for several)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_compile_argument(p)


def run(args: argparse.Namespace) -> int:
    from ..loading import load

    for c in args.case:  # a missing or broken case file is reported before the model loads
        load_case(c)
    lm = load(args.model, device=args.device, dtype=args.dtype, progress=not args.json, quantize=args.quantize)
    runner = case_runner(lm, args.case, compile=args.compile)
    if runner.stepper.compile:  # the variants greedy cases use, compiled before the first case
        greedy = [k for k in runner.stepper.variants() if k[0] == "think" or k[3]]
        runner.stepper.warmup(progress=not args.json, keys=greedy)
    reports = [run_case(lm, c, runner) for c in args.case]
    if args.json:
        out = [r.to_dict() for r in reports]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        for r in reports:
            print(r.summary())
    return 0 if all(r.passed for r in reports) else 1

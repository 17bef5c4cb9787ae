"""Whole responses through the engine's stepper: a single-response call is a session with one slot.

``generate`` (and ``Chroma.chat``/``speak``, ``openchroma conformance``) run exactly the code the streaming
engine runs — the same planner, the same batched frame step, the same Mimi frame decoding — so what the
reference cases check is what the server serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..models.chroma import ChromaModel
from ..voice import VoicePrompt
from .sampling import SamplingParams
from .schedule import DEFAULT_MAX_FRAMES, backbone_budget, reasoner_budget
from .stepper import StepOutput, Stepper, default_threads, intra_op_threads


@dataclass
class GenerationResult:
    text_tokens: list[int]          # the text tokens that entered the speech, in order (the last may be im_end)
    codes: torch.Tensor             # [frames, K]
    prefill_logits: torch.Tensor    # the reasoner's logits at the last prompt position
    stop_reason: str                # eos | length | cancelled
    audio: torch.Tensor | None = None   # 24 kHz float32, frame by frame as the engine decodes it
    timings: dict[str, float] = field(default_factory=dict)


class ResponseRunner:
    """A one-slot stepper that runs whole responses; reuse it to keep compiled graphs across calls."""

    def __init__(self, model: ChromaModel, reasoner_len: int, backbone_len: int, lookahead: int = 2,
                 compile: bool = False):
        self.model = model
        self.lookahead = lookahead
        self.stepper = Stepper(model, 1, reasoner_len, backbone_len, lookahead=lookahead, compile=compile)
        if self.stepper.cuda_graphs:  # graphs are captured before any response (capture needs an idle stepper)
            self.stepper.warmup()

    def fits(self, prompt_len: int, voice_len: int, max_frames: int) -> bool:
        """Whether a response of these sizes fits this runner's caches."""
        st = self.stepper
        return (reasoner_budget(prompt_len, max_frames, self.lookahead) <= st.reasoner_len
                and backbone_budget(voice_len, max_frames) <= st.backbone_len)

    @classmethod
    def for_call(cls, model: ChromaModel, prompt_len: int, voice_len: int, max_frames: int,
                 **kw) -> ResponseRunner:
        lookahead = kw.get("lookahead", 2)
        return cls(model, reasoner_budget(prompt_len, max_frames, lookahead), backbone_budget(voice_len, max_frames),
                   **kw)

    def run(self, *args, **kw) -> GenerationResult:
        """One whole response (see ``_run`` for the arguments), stepped with the engine's thread rule."""
        with intra_op_threads(default_threads(self.model)), torch.inference_mode():
            return self._run(*args, **kw)

    def _run(
        self,
        input_ids: torch.Tensor | Sequence[int],
        voice: VoicePrompt,
        input_features: torch.Tensor | None = None,
        max_new_frames: int = DEFAULT_MAX_FRAMES,
        sampling: SamplingParams | None = None,
        forced_text_tokens: Sequence[int] | None = None,
        audio_embeds: torch.Tensor | None = None,
        decode_audio: bool = True,
        on_frame: Callable[[StepOutput], None] | None = None,
    ) -> GenerationResult:
        if max_new_frames < 1:
            raise ValueError(f"max_new_frames must be >= 1, got {max_new_frames}")
        m, st = self.model, self.stepper
        cfg, dev = m.cfg, st.device
        t0 = time.perf_counter()
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=dev).reshape(1, -1)
        if audio_embeds is None and input_features is not None:
            mel = input_features.to(dev, st.dtype).reshape(input_features.shape[-2], -1)
            audio_embeds = m.thinker.audio_tower(mel)
        forced = None
        if forced_text_tokens is not None:
            forced = [int(t) for t in forced_text_tokens]
            if not forced or forced[-1] != cfg.im_end_token_id:
                forced.append(cfg.im_end_token_id)

        # Reasoner prefill, then the voice prompt into the backbone's cache.
        h_last = st.reasoner_prefill([(0, m.thinker.embed(ids, audio_embeds)[0], 0)])[0]
        prefill_logits = m.reasoner_logits(h_last).float()
        first = forced[0] if forced else int(prefill_logits.argmax(-1))
        voice_embeds = m.voice_prompt_embeds(voice.text_ids.to(dev), voice.codes.to(dev)).to(st.dtype)
        if voice_embeds.shape[0] + 2 > st.backbone_len:
            raise ValueError(f"the voice prompt ({voice_embeds.shape[0]} positions) does not fit the backbone "
                             f"cache ({st.backbone_len})")
        st.backbone_prefill([(0, voice_embeds, 0)])
        st.start(0, voice_embeds.shape[0], h_last, first, ids.shape[1], sampling or SamplingParams(),
                 max_new_frames, forced)
        t_first = None

        text: list[int] = []
        codes: list[torch.Tensor] = []
        audio: list[torch.Tensor] = []
        stop = ""
        try:
            while st.active:
                for out in st.step():
                    if out.text_token is not None:
                        text.append(out.text_token)
                    if out.codes is not None:
                        t_first = t_first or time.perf_counter()
                        codes.append(out.codes)
                        if decode_audio:
                            audio.append(out.audio)
                    if on_frame is not None:
                        on_frame(out)
                    if out.finished:
                        stop = out.finished
        finally:
            st.rows.clear()   # a failed or interrupted run leaves the runner usable
        k = cfg.audio_num_codebooks
        now = time.perf_counter()
        result = GenerationResult(
            text, torch.stack(codes) if codes else torch.zeros(0, k, dtype=torch.long), prefill_logits.cpu(), stop,
            (torch.cat(audio) if audio else torch.zeros(0)) if decode_audio else None,
            {"seconds": now - t0, "ttft_ms": (t_first - t0) * 1000 if t_first else float("nan"),
             "frames": len(codes)})
        return result

    def cancel(self) -> None:
        self.stepper.cancel(0)


def generate(
    model: ChromaModel,
    input_ids: torch.Tensor | Sequence[int],
    voice: VoicePrompt,
    input_features: torch.Tensor | None = None,
    max_new_frames: int = DEFAULT_MAX_FRAMES,
    sampling: SamplingParams | None = None,
    forced_text_tokens: Sequence[int] | None = None,
    decode_audio: bool = True,
    audio_embeds: torch.Tensor | None = None,
) -> GenerationResult:
    """Run one whole response; with ``decode_audio`` the result carries its 24 kHz audio."""
    n_prompt = torch.as_tensor(input_ids).numel()
    runner = ResponseRunner.for_call(model, n_prompt, voice.backbone_length, max_new_frames)
    return runner.run(input_ids, voice, input_features, max_new_frames, sampling, forced_text_tokens, audio_embeds,
                      decode_audio)

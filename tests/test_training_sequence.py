"""Item 3 of issue 13: the training sequence is the inference sequence.

The teacher-forced training forward's codebook-0 and codebook-1..7 logits at every frame equal the logits the
frame-by-frame reference loop computes when it is forced through the same text and codes.
"""

from __future__ import annotations

import pytest
import torch
from training_helpers import reference_generation_module

from openchroma.models.audio_encoder import audio_token_count
from openchroma.training.sequence import (
    ResponseExample,
    enable_checkpointing,
    eos_frame,
    reasoner_response_hidden,
    teacher_forced,
)
from openchroma.voice import VoicePrompt

# float32; the batched teacher-forced pass sums in another order than the step-by-step loop (observed max
# absolute difference ~3e-5 on logits of magnitude up to ~5).
TOL = {"rtol": 1e-5, "atol": 5e-5}


def _forced_reference(model, prompt_ids, voice, text, codes, features=None):
    """Run the reference loop forced through ``text`` and ``codes``; return the logits it was given per frame."""
    ref = reference_generation_module()
    seen: list[dict[int, torch.Tensor]] = []

    class Forced(ref.Generation):
        def _sample_code(self, logits, codebook):
            if codebook == 0:
                seen.append({})
            frame = len(seen) - 1
            seen[frame][codebook] = logits.detach().float().clone()[0]
            return codes[frame, codebook].reshape(1).to(logits.device)

    gen = Forced(model, prompt_ids, voice, input_features=features, max_new_frames=codes.shape[0],
                 forced_text_tokens=text)
    for _ in gen:
        pass
    return seen, gen


@pytest.mark.parametrize("with_audio", [False, True])
@pytest.mark.parametrize("n_frames,n_text", [(9, 4), (6, 6)])
def test_teacher_forced_logits_equal_reference(tiny_model, with_audio, n_frames, n_text):
    model = tiny_model.model
    cfg = tiny_model.config
    g = torch.Generator().manual_seed(n_frames * 10 + n_text)
    features = None
    audio_embeds = None
    prompt = [151644, 8948, 198] + torch.randint(100, 5000, (7,), generator=g).tolist()
    if with_audio:
        features = torch.randn(128, 130, generator=g)
        n_audio = audio_token_count(features.shape[-1])
        prompt += [cfg.audio_start_token_id] + [cfg.audio_token_index] * n_audio + [cfg.audio_end_token_id]
        with torch.no_grad():
            audio_embeds = model.thinker.audio_tower(features)
    prompt += [151645, 198, 151644, 77091, 198]
    prompt_ids = torch.tensor(prompt)
    text = torch.randint(100, 5000, (n_text - 1,), generator=g).tolist() + [cfg.im_end_token_id]
    voice = VoicePrompt(torch.randint(100, 5000, (5,), generator=g),
                        torch.randint(0, 2048, (4, cfg.audio_num_codebooks), generator=g))
    codes = torch.randint(1, 2048, (n_frames - 1, cfg.audio_num_codebooks), generator=g)
    codes = torch.cat([codes, eos_frame(model)[None]])  # the response ends: the end-of-audio frame is last

    seen, gen = _forced_reference(model, prompt_ids, voice, text, codes, features)
    assert gen.stop_reason == "eos" and len(seen) == n_frames
    assert gen.text_tokens == text[: len(gen.text_tokens)]

    with torch.no_grad():
        hidden = reasoner_response_hidden(model, prompt_ids, torch.tensor(text), audio_embeds)
        out = teacher_forced(model, [ResponseExample(voice.text_ids, voice.codes, hidden, torch.tensor(text),
                                                     codes)])
    assert out.c0.shape[0] == n_frames
    for f in range(n_frames):
        torch.testing.assert_close(out.c0[f], seen[f][0], **TOL, msg=lambda m, f=f: f"c0 logits, frame {f}: {m}")
        for i in range(1, cfg.audio_num_codebooks):
            torch.testing.assert_close(out.rest[f, i - 1], seen[f][i], **TOL,
                                       msg=lambda m, f=f, i=i: f"c{i} logits, frame {f}: {m}")


def test_batched_and_checkpointed_forward_match_single(tiny_random_dir):
    """Right-padded batches and gradient checkpointing change neither logits nor gradients."""
    from openchroma.loading import load

    model = load(tiny_random_dir, device="cpu", progress=False).model
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    exs = []
    for n_text, n_frames in [(3, 7), (5, 4)]:
        exs.append(ResponseExample(torch.randint(0, 700, (3,), generator=g),
                                   torch.randint(0, 2048, (2, cfg.audio_num_codebooks), generator=g),
                                   torch.randn(n_text, cfg.reasoner.hidden_size, generator=g),
                                   torch.randint(0, 700, (n_text,), generator=g),
                                   torch.randint(0, 2048, (n_frames, cfg.audio_num_codebooks), generator=g)))

    def loss_and_grad():
        model.zero_grad()
        out = teacher_forced(model, exs)
        loss = out.c0.logsumexp(-1).sum() + out.rest.logsumexp(-1).sum()
        loss.backward()
        return out, model.backbone.model.layers[0].self_attn.q_proj.weight.grad.clone()

    batched, grad = loss_and_grad()
    singles = [teacher_forced(model, [ex]) for ex in exs]
    torch.testing.assert_close(batched.c0, torch.cat([s.c0 for s in singles]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.rest, torch.cat([s.rest for s in singles]), rtol=1e-5, atol=1e-5)
    enable_checkpointing(model.backbone.model)
    enable_checkpointing(model.decoder.model)
    again, grad2 = loss_and_grad()
    torch.testing.assert_close(again.c0, batched.c0)
    torch.testing.assert_close(grad2, grad, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_forward_and_backward(tiny_random_dir):
    """The training forward under bfloat16 autocast (what `train` uses on CUDA; here on the CPU)."""
    from openchroma.loading import load
    from openchroma.training.train import Trainee

    model = load(tiny_random_dir, device="cpu", progress=False).model
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    ex = ResponseExample(torch.randint(0, 700, (3,), generator=g),
                         torch.randint(0, 2048, (2, cfg.audio_num_codebooks), generator=g),
                         torch.randn(3, cfg.reasoner.hidden_size, generator=g),
                         torch.randint(0, 700, (3,), generator=g),
                         torch.randint(0, 2048, (6, cfg.audio_num_codebooks), generator=g))
    full = Trainee(model)([ex], torch.arange(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = Trainee(model)([ex], torch.arange(6))
    for a, b in zip(full, half, strict=True):
        torch.testing.assert_close(b.float(), a, rtol=2e-2, atol=0)
    (half[0] + half[1]).backward()
    assert model.backbone.codebook0_head.weight.grad.dtype == torch.float32

"""The training sequence is the inference sequence.

:func:`response_inputs` is the one place that lays out the backbone's input for a response: the voice
prompt (``ChromaModel.voice_prompt_embeds``), then the 1:2 interleave of reasoner pairs and frames exactly as
:func:`openchroma.engine.schedule.response_layout` orders it. Training feeds that sequence through the
backbone in one causal pass (teacher forcing); the consistency test checks that the codebook-0 and
codebook-1..7 logits it gives equal, frame by frame, those of the frame-by-frame reference loop forced
through the same codes.

The forwards here are differentiable (no ``inference_mode``): each layer gets fresh key/value storage of the
sequence's length, so a full-sequence pass through ``Transformer.forward`` with positions ``0..L-1`` is a
plain causal transformer pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..engine.schedule import response_layout
from ..models.chroma import ChromaModel
from ..models.transformer import Transformer


class _FreshCache:
    """Key/value storage for one full-sequence pass: separate tensors per layer, so autograd can save them."""

    def __init__(self, transformer: Transformer, batch: int, length: int, like: torch.Tensor):
        cfg = transformer.cfg
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        # Under autocast the projections come out in the autocast dtype; keys then meet the rope tables (in the
        # activations' dtype), which promotes them, values do not.
        dev = like.device.type
        proj = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else like.dtype
        k_dtype, v_dtype = torch.promote_types(proj, like.dtype), proj
        self.k = [_mark_fresh(torch.zeros(shape, dtype=k_dtype, device=like.device)) for _ in range(cfg.num_layers)]
        self.v = [_mark_fresh(torch.zeros(shape, dtype=v_dtype, device=like.device)) for _ in range(cfg.num_layers)]
        self.batch_size = batch
        self.max_len = length


def _mark_fresh(t: torch.Tensor) -> torch.Tensor:
    t._openchroma_fresh_kv = True  # replaced by new zeros inside a checkpointed layer (see enable_checkpointing)
    return t


def full_forward(transformer: Transformer, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Causal pass of ``x`` ``[B, T, H]`` through ``transformer`` (final norm applied), differentiably.

    ``positions`` ``[B, T]`` (rope positions and cache slots) default to ``0..T-1``; slot ``s`` attends to
    slots ``<= s``.
    """
    b, t, _ = x.shape
    if positions is None:
        positions = torch.arange(t, device=x.device).expand(b, t)
    return transformer(x, positions, _FreshCache(transformer, b, t, x), kv_len=t)


def enable_checkpointing(transformer: Transformer) -> None:
    """Gradient checkpointing, layer by layer: activations are recomputed in the backward pass."""
    for layer in transformer.layers:
        if getattr(layer, "_openchroma_checkpointed", False):
            continue
        orig = layer.forward

        def run(*args, _orig=orig, **kwargs):
            # The layer writes its keys/values into the cache tensors it is given; inside the checkpointed
            # region they must be new tensors each time (forward and recomputation), never the saved inputs.
            args = tuple(torch.zeros_like(a) if getattr(a, "_openchroma_fresh_kv", False) else a for a in args)
            kwargs = {k: torch.zeros_like(v) if getattr(v, "_openchroma_fresh_kv", False) else v
                      for k, v in kwargs.items()}
            return _orig(*args, **kwargs)

        layer.forward = functools.partial(checkpoint, run, use_reentrant=False)
        layer._openchroma_checkpointed = True


@dataclass
class ResponseExample:
    """What the backbone and decoder need for one response, all on one device.

    ``hidden`` ``[n_text, H]``: the reasoner's hidden state that produced each response text token (the last
    token is ``im_end``); ``text_ids`` ``[n_text]``; ``codes`` ``[n_frames, K]`` the response's frames, the
    end-of-audio frame included when the response ends; ``voice_text_ids``/``voice_codes``: the voice prompt.
    """

    voice_text_ids: torch.Tensor
    voice_codes: torch.Tensor
    hidden: torch.Tensor
    text_ids: torch.Tensor
    codes: torch.Tensor


def eos_frame(model: ChromaModel, device: torch.device | None = None) -> torch.Tensor:
    """The end-of-audio frame ``[K]``: every code ``codebook_eos_token_id``."""
    cfg = model.cfg
    return torch.full((cfg.audio_num_codebooks,), cfg.codebook_eos_token_id, dtype=torch.long, device=device)


def response_inputs(model: ChromaModel, ex: ResponseExample) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's input ``[L, H]`` for a response and, per frame, the index whose output predicts its ``c0``.

    Voice prompt, then ``response_layout(n_text, n_frames)``: ``("H", j)`` is ``hidden[j]``, ``("E", j)``
    the Reasoner's embedding of ``text_ids[j]``, ``("A", f)`` the summed code embeddings of frame ``f``. Text
    that the frames cannot carry is not fed (as at inference).
    """
    n_text, n_frames = int(ex.text_ids.shape[0]), int(ex.codes.shape[0])
    layout = response_layout(n_text, n_frames)
    voice = model.voice_prompt_embeds(ex.voice_text_ids, ex.voice_codes)
    dtype = voice.dtype
    text_emb = model.text_embedding(ex.text_ids.to(voice.device)).to(dtype)
    frame_emb = model.frame_embedding(ex.codes.to(voice.device)).to(dtype)
    hidden = ex.hidden.to(device=voice.device, dtype=dtype)
    # One table of every entry the layout can name, then one gather: H rows, then E rows, then A rows.
    table = torch.cat([hidden, text_emb, frame_emb])
    offset = {"H": 0, "E": n_text, "A": 2 * n_text}
    rows = table[torch.tensor([offset[kind] + j for kind, j in layout.entries], device=voice.device)]
    predicts = torch.tensor(layout.predicts, device=voice.device) + voice.shape[0]
    return torch.cat([voice, rows]), predicts


def decoder_inputs(model: ChromaModel, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The decoder's teacher-forced input ``[N, K, H]`` for frames: ``h, A0[c0], A1[c1], .., A_{K-2}[c_{K-2}]``."""
    k = model.cfg.audio_num_codebooks
    emb = model.audio_embedding(codes[:, : k - 1] + model.codebook_offsets[: k - 1])
    return torch.cat([hidden[:, None].to(emb.dtype), emb], dim=1)


def decoder_logits(model: ChromaModel, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, K-1, V]`` of codebooks ``1..K-1`` from backbone hidden ``[N, H]`` and the frames' codes.

    Rope positions ``0, 0, 1, .., K-2`` (the published loop's numbering, ``ChromaModel.decode_frame``); the
    output at entry ``i`` (``i >= 1``) predicts ``c_i``.
    """
    dec = model.decoder
    k = model.cfg.audio_num_codebooks
    x = dec.projection(decoder_inputs(model, hidden, codes))
    n = x.shape[0]
    pos = model.decoder_positions[:k].expand(n, k)
    slots = torch.arange(k, device=x.device).expand(n, k)
    out = dec.model(x, pos, _FreshCache(dec.model, n, k, x), slots, kv_len=k)
    return torch.einsum("nih,ihv->niv", out[:, 1:], dec.codebook_head.weight.to(out.dtype))


@dataclass
class ForwardOutput:
    """Teacher-forced logits: ``c0`` ``[F, V]`` for every frame of the batch (examples concatenated), ``rest``
    ``[F', K-1, V]`` for the frames in ``decoder_frames`` (all by default), and the frames' target codes."""

    c0: torch.Tensor
    rest: torch.Tensor
    codes: torch.Tensor
    decoder_frames: torch.Tensor
    frames_per_example: list[int]


def teacher_forced(
    model: ChromaModel,
    examples: Sequence[ResponseExample],
    decoder_frames: torch.Tensor | None = None,
) -> ForwardOutput:
    """One causal backbone pass over a (right-padded) batch of responses, then the decoder on their frames.

    ``decoder_frames`` (indices into the concatenated frames) restricts the decoder to a subset of frames
    (decoder amortisation).
    """
    seqs, preds = zip(*(response_inputs(model, ex) for ex in examples), strict=True)
    longest = max(s.shape[0] for s in seqs)
    x = nn.utils.rnn.pad_sequence(list(seqs), batch_first=True)  # right padding never reaches a real query
    assert x.shape[1] == longest
    h = full_forward(model.backbone.model, x)
    rows = torch.cat([torch.full_like(p, i) for i, p in enumerate(preds)])
    hidden = h[rows, torch.cat(preds)]
    codes = torch.cat([ex.codes.to(hidden.device) for ex in examples])
    c0 = model.codebook0_logits(hidden)
    if decoder_frames is None:
        decoder_frames = torch.arange(codes.shape[0], device=hidden.device)
    rest = decoder_logits(model, hidden[decoder_frames], codes[decoder_frames])
    return ForwardOutput(c0, rest, codes, decoder_frames, [int(p.shape[0]) for p in preds])


def reasoner_response_hidden(
    model: ChromaModel,
    prompt_ids: torch.Tensor,
    response_ids: torch.Tensor,
    audio_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reasoner's hidden states ``[n_text, H]`` for a response, teacher-forced on its tokens.

    The Reasoner runs on ``prompt + t_0..t_{n-2}``: the state at the last prompt position produced ``t_0``,
    the state after consuming ``t_{j-1}`` produced ``t_j`` — the states inference feeds as ``H(j)``.
    """
    dev = model.thinker.model.norm.weight.device
    ids = torch.cat([prompt_ids.reshape(-1), response_ids.reshape(-1)[:-1]]).to(dev)[None]
    x = model.thinker.embed(ids, audio_embeds)
    h = full_forward(model.thinker.model, x)
    n_prompt = prompt_ids.numel()
    return h[0, n_prompt - 1:]

"""The four parts of Chroma 1.0 (Reasoner, Backbone, Decoder, Codec) and the per-step computations the
generator and engine share.

Parameter names follow the published checkpoint, whose keys name the parts ``thinker.*`` (the Reasoner),
``backbone.*``, ``decoder.*`` and ``codec_model.*``; the attribute names below are those keys. The Backbone's
audio embedding is the Decoder's (one tensor in the file), and with ``tie_word_embeddings`` the Reasoner's
``lm_head`` is its ``embed_tokens``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ChromaConfig
from .audio_encoder import AudioEncoder
from .codec import Codec, CodecConfig
from .transformer import KVCache, Transformer


class Reasoner(nn.Module):
    """The Reasoner (Qwen2.5-Omni's "thinker"): audio encoder + Qwen2 text model."""

    def __init__(self, cfg: ChromaConfig, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        tc = cfg.reasoner
        self.audio_tower = AudioEncoder(cfg.audio_encoder)
        self.model = Transformer(tc, with_embedding=True, max_positions=max_positions)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, make ``lm_head`` share ``embed_tokens``' parameter (again, after an
        ``assign`` load replaced it). A quantized table and head share their int8 tensors instead."""
        if self.cfg.tie_word_embeddings and isinstance(self.model.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor, audio_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[1, T, H]``; ``<|AUDIO|>`` placeholders take ``audio_embeds`` in order."""
        x = self.model.embed_tokens(input_ids)
        is_audio = input_ids == self.cfg.audio_token_index
        n_slots = int(is_audio.sum())
        n_audio = 0 if audio_embeds is None else audio_embeds.shape[0]
        if n_slots != n_audio:
            raise ValueError(f"the prompt has {n_slots} <|AUDIO|> tokens but the audio gives {n_audio} embeddings")
        if n_audio:
            x = x.masked_scatter(is_audio.unsqueeze(-1), audio_embeds.to(x.dtype))
        return x


class Backbone(nn.Module):
    """Writes codebook 0 of each 80 ms frame from the Reasoner's text stream and the frames so far."""

    def __init__(self, cfg: ChromaConfig, max_positions: int | None = None):
        super().__init__()
        bc = cfg.backbone
        # Rope extrapolates past the trained length; responses (one position per frame, two per text
        # token) may run longer than max_position_embeddings.
        self.model = Transformer(bc, max_positions=max(max_positions or 0, bc.max_position_embeddings, 16384))
        self.codebook0_head = nn.Linear(bc.hidden_size, bc.vocab_size, bias=False)


class AudioEmbedding(nn.Module):
    def __init__(self, num_codebooks: int, vocab: int, dim: int):
        super().__init__()
        self.embed_audio_tokens = nn.Embedding(num_codebooks * vocab, dim)


class CodebookHeads(nn.Module):
    """One ``[H, V]`` matrix per codebook 1..K-1, applied as ``x @ weight[i]``."""

    def __init__(self, n: int, dim: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, dim, vocab))

    def forward(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Logits of codebook ``i + 1`` from the Decoder's output ``h`` ``[B, H]``."""
        return h @ self.weight[i]


class Decoder(nn.Module):
    """Fills codebooks 1..K-1 of a frame from the Backbone's hidden state and codebook 0."""

    def __init__(self, cfg: ChromaConfig):
        super().__init__()
        dc = cfg.decoder
        k = cfg.audio_num_codebooks
        self.projection = nn.Linear(cfg.backbone.hidden_size, dc.hidden_size, bias=False)
        self.model = Transformer(dc, max_positions=max(dc.max_position_embeddings, k + 1))
        self.codebook_head = CodebookHeads(k - 1, dc.hidden_size, dc.vocab_size)
        self.audio_embedding = AudioEmbedding(k, cfg.audio_vocab_size, cfg.backbone.hidden_size)


class ChromaModel(nn.Module):
    """Chroma 1.0: ``thinker`` (the Reasoner), ``backbone``, ``decoder`` and ``codec_model`` (the Codec), named
    as the checkpoint's keys."""

    def __init__(self, cfg: ChromaConfig, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.thinker = Reasoner(cfg, max_positions)
        self.backbone = Backbone(cfg, max_positions)
        self.decoder = Decoder(cfg)
        self.codec_model = Codec(CodecConfig.from_dict(cfg.codec), num_codebooks=cfg.audio_num_codebooks)
        self._init_own_buffers()

    def _init_own_buffers(self, device: torch.device | None = None) -> None:
        k = self.cfg.audio_num_codebooks
        offsets = torch.arange(k, device=device) * self.cfg.audio_vocab_size
        self.register_buffer("codebook_offsets", offsets, persistent=False)
        # Decoder entries: h and c_0 share rope position 0, c_i sits at i (the published loop's numbering).
        self.register_buffer("decoder_positions", torch.tensor([0] + list(range(k)), device=device), persistent=False)

    @torch.no_grad()
    def init_buffers(self, device: torch.device) -> None:
        """Compute every derived (non-persistent) buffer on ``device``: rotary tables, audio positions, the
        Codec's lookup tables from its loaded weights. For a model built on ``meta`` and loaded with
        ``load_state_dict(assign=True)``."""
        self._init_own_buffers(device)
        for m in self.modules():
            if m is not self and hasattr(m, "init_buffers"):
                m.init_buffers(device)
        self.codec_model.refresh_buffers()

    @property
    def device(self) -> torch.device:
        return self.codebook_offsets.device

    @property
    def dtype(self) -> torch.dtype:
        """The load dtype (activations, caches): the norms' (never quantized)."""
        return self.backbone.model.norm.weight.dtype

    # ----- embeddings -------------------------------------------------------------------------
    @property
    def audio_embedding(self) -> nn.Module:
        return self.decoder.audio_embedding.embed_audio_tokens

    def text_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Text tokens enter the backbone through the Reasoner's own table."""
        return self.thinker.model.embed_tokens(token_ids)

    def frame_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """``A(frame)``: codes ``[..., K]`` -> the sum of their codebook embeddings ``[..., H]``."""
        return self.audio_embedding(codes + self.codebook_offsets).sum(-2)

    def voice_prompt_embeds(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``E(text_start) E(transcript) E(text_end) A(f_1..f_m) 0`` as ``[1 + n + 1 + m + 1, H]``."""
        cfg = self.cfg
        dev = self.device
        ids = torch.cat([
            torch.tensor([cfg.text_start_token_id], device=dev),
            text_ids.reshape(-1).to(dev),
            torch.tensor([cfg.text_end_token_id], device=dev),
        ])
        text = self.text_embedding(ids)
        audio = self.frame_embedding(codes.to(dev))
        zero = torch.zeros_like(text[:1])
        return torch.cat([text, audio.to(text.dtype), zero], dim=0)

    # ----- the Reasoner -----------------------------------------------------------------------
    def reasoner_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.thinker.lm_head(hidden)

    # ----- the Backbone -----------------------------------------------------------------------
    def codebook0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.codebook0_head(hidden)

    # ----- the Decoder ------------------------------------------------------------------------
    def decode_frame(
        self,
        hidden: torch.Tensor,
        c0: torch.Tensor,
        cache: KVCache,
        sample_fn,
    ) -> torch.Tensor:
        """Codes ``[B, K]`` of a frame from backbone hidden ``[B, H]`` and codebook-0 codes ``[B]``.

        ``cache`` is a decoder cache of at least ``K`` slots (its content is overwritten: the
        decoder starts fresh every frame). ``sample_fn(logits [B, V], codebook) -> [B]``.
        """
        dec = self.decoder
        k = self.cfg.audio_num_codebooks
        b = hidden.shape[0]
        pos = self.decoder_positions
        first = torch.stack([hidden, self.audio_embedding(c0)], dim=1)
        x = dec.model(dec.projection(first), pos[:2].expand(b, 2), cache, torch.arange(2, device=pos.device)
                      .expand(b, 2), kv_len=k)
        codes = [c0]
        h = x[:, -1]
        for i in range(1, k):
            code = sample_fn(dec.codebook_head(h, i - 1), i)
            codes.append(code)
            if i == k - 1:
                break
            e = dec.projection(self.audio_embedding(code + self.codebook_offsets[i]))
            slot = pos.new_full((b, 1), i + 1)
            h = dec.model(e[:, None], pos[i + 1:i + 2].expand(b, 1), cache, slot, kv_len=k)[:, -1]
        return torch.stack(codes, dim=1)


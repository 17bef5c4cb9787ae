"""The Codec: Kyutai's Mimi neural audio codec (codes <-> 24 kHz audio) as plain PyTorch modules.

Parameter names follow the Hugging Face ``MimiModel`` layout as saved by transformers 5.0
(``encoder.layers.*``, ``encoder_transformer.*``, ``downsample.*``, ``quantizer.*``, ``upsample.*``,
``decoder_transformer.*``, ``decoder.layers.*``), so a checkpoint's ``codec_model.*`` tensors load with the
prefix stripped.

Whole-sequence ``encode``/``decode`` reproduce ``transformers.MimiModel``; ``decode_step`` decodes frame by
frame with an explicit, pre-allocated :class:`~.state.CodecStreamState` (conv left contexts, transposed-conv
overlap-add tails, a ring KV cache sized to the sliding window, per-row positions) so batch rows can be at
different positions and be reset independently.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CodecConfig
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SeanetConv1d, SeanetConvTranspose1d, SeanetDecoder, SeanetEncoder
from .state import CodecStreamState
from .transformer import CodecTransformer


class Codec(nn.Module):
    """The Mimi codec; uses the first ``num_codebooks`` codebooks for encode/decode.

    Call :meth:`refresh_buffers` after changing codebook or projection tensors by hand (``load_state_dict``
    does it).
    """

    def __init__(self, cfg: CodecConfig, num_codebooks: int = 8) -> None:
        super().__init__()
        if not cfg.num_semantic_quantizers <= num_codebooks <= cfg.num_quantizers:
            raise ValueError(f"num_codebooks={num_codebooks} out of range")
        self.cfg = cfg
        self.num_codebooks = num_codebooks
        self.encoder = SeanetEncoder(cfg)
        self.encoder_transformer = CodecTransformer(cfg)
        stride = cfg.latent_stride
        self.downsample: SeanetConv1d | None = None
        self.upsample: SeanetConvTranspose1d | None = None
        if cfg.resample:
            self.downsample = SeanetConv1d(
                cfg.hidden_size,
                cfg.hidden_size,
                2 * stride,
                stride=stride,
                bias=False,
                causal=cfg.use_causal_conv,
                pad_mode="replicate",
            )
        self.quantizer = SplitResidualVectorQuantizer(cfg)
        if cfg.resample:
            self.upsample = SeanetConvTranspose1d(
                cfg.hidden_size,
                cfg.hidden_size,
                2 * stride,
                stride=stride,
                groups=cfg.upsample_groups,
                bias=False,
                causal=cfg.use_causal_conv,
                trim_right_ratio=cfg.trim_right_ratio,
            )
        self.decoder_transformer = CodecTransformer(cfg)
        self.decoder = SeanetDecoder(cfg)

        self._stream_modules: list[SeanetConv1d | SeanetConvTranspose1d] = []
        for m in ([self.upsample] if self.upsample is not None else []) + list(self.decoder.modules()):
            if isinstance(m, (SeanetConv1d, SeanetConvTranspose1d)):
                m.state_index = len(self._stream_modules)
                self._stream_modules.append(m)

        # Derived, non-persistent: codebook vectors for encoding [K, N, Dq] and decode tables [K, N, hidden]
        # (codebook vectors through the output projection).
        self.register_buffer("codebook_vectors", torch.empty(0), persistent=False)
        self.register_buffer("decode_table", torch.empty(0), persistent=False)
        self.register_buffer(
            "codebook_offsets", torch.arange(num_codebooks) * cfg.codebook_size, persistent=False
        )
        self.refresh_buffers()
        self.register_load_state_dict_post_hook(Codec._after_load)

    @staticmethod
    def _after_load(module: nn.Module, _incompatible_keys: Any) -> None:
        assert isinstance(module, Codec)
        module.refresh_buffers()

    @property
    def _ref_weight(self) -> Tensor:
        """A weight giving the module's device and compute dtype."""
        return self.decoder.layers[0].conv.weight

    # ---- derived buffers --------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_buffers(self) -> None:
        """Precompute codebook vectors / decode tables (float32 math) and rotary frequencies."""
        ref = self._ref_weight
        self.encoder_transformer.init_buffers(ref.device)
        self.decoder_transformer.init_buffers(ref.device)
        self.codebook_offsets = torch.arange(self.num_codebooks, device=ref.device) * self.cfg.codebook_size
        if ref.device.type == "meta":
            return
        vecs, tables = [], []
        for rvq, _, count in self.quantizer.groups(self.num_codebooks):
            for layer in rvq.layers[:count]:
                e = layer.codebook.vectors()
                vecs.append(e)
                if rvq.output_proj is not None:
                    e = e @ rvq.output_proj.weight[:, :, 0].float().t()
                tables.append(e)
        self.codebook_vectors = torch.stack(vecs).to(ref.dtype)
        self.decode_table = torch.stack(tables).to(ref.dtype)

    # ---- encode -----------------------------------------------------------------------------------
    def _quantize(self, latents: Tensor) -> Tensor:
        """latents ``[B, hidden, F]`` -> codes ``[B, K, F]`` (HF's residual argmin via ``torch.cdist``)."""
        B, _, Fr = latents.shape
        codes = []
        for rvq, first, count in self.quantizer.groups(self.num_codebooks):
            h = rvq.input_proj(latents) if rvq.input_proj is not None else latents
            residual = h.transpose(1, 2)  # [B, F, Dq]
            for i in range(first, first + count):
                embed = self.codebook_vectors[i]
                flat = residual.reshape(-1, residual.shape[-1])
                ind = torch.cdist(flat[None].float(), embed[None].float(), p=2)[0].argmin(dim=-1).view(B, Fr)
                residual = residual - F.embedding(ind, embed)
                codes.append(ind)
        return torch.stack(codes, dim=1)

    @torch.no_grad()
    def encode_latents(self, audio: Tensor) -> Tensor:
        """audio ``[B, T]`` (or ``[B, C, T]``) -> continuous latents ``[B, hidden, ceil(T / frame_size)]``."""
        x = audio[:, None] if audio.dim() == 2 else audio
        x = x.to(self._ref_weight.dtype)
        h = self.encoder(x)
        h = self.encoder_transformer(h.transpose(1, 2)).transpose(1, 2)
        if self.downsample is not None:
            h = self.downsample(h)
        return h

    @torch.no_grad()
    def encode(self, audio: Tensor) -> Tensor:
        """audio ``[B, T]`` float at 24 kHz -> codes ``[B, num_codebooks, ceil(T / frame_size)]`` int64."""
        return self._quantize(self.encode_latents(audio))

    # ---- decode -----------------------------------------------------------------------------------
    def _dequantize(self, codes: Tensor) -> Tensor:
        """codes ``[B, K, F]`` -> latents ``[B, hidden, F]`` (sum of the projected codebook vectors)."""
        K = codes.shape[1]
        if K > self.num_codebooks:
            raise ValueError(f"got {K} codebooks, this Codec decodes at most {self.num_codebooks}")
        idx = codes.long() + self.codebook_offsets[:K, None]
        table = self.decode_table.view(-1, self.decode_table.shape[-1])
        return F.embedding(idx, table).sum(dim=1).transpose(1, 2)

    def _squeeze(self, audio: Tensor) -> Tensor:
        return audio[:, 0] if self.cfg.audio_channels == 1 else audio

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[B, K, F]`` -> audio ``[B, F * frame_size]`` (whole sequence at once)."""
        h = self._dequantize(codes)
        if self.upsample is not None:
            h = self.upsample(h)
        h = self.decoder_transformer(h.transpose(1, 2)).transpose(1, 2)
        return self._squeeze(self.decoder(h))

    def stream_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_frames_per_step: int = 1,
    ) -> CodecStreamState:
        """Fresh (zeroed) streaming state for ``batch_size`` rows, in the module's device/dtype by default;
        ``decode_step`` then takes up to ``max_frames_per_step`` frames per call. Codes must be below
        ``codebook_size`` (not checked, to avoid a host sync)."""
        ref = self._ref_weight
        device = torch.device(device) if device is not None else ref.device
        dtype = dtype or ref.dtype
        W = self.cfg.sliding_window
        if W is None:
            raise NotImplementedError("streaming decode needs a sliding window")
        if not self.cfg.use_causal_conv or self.cfg.pad_mode not in ("constant", "replicate"):
            raise NotImplementedError("streaming decode needs causal convs with constant/replicate padding")
        tokens = max_frames_per_step * self.cfg.latent_stride
        capacity = -(-(W + tokens - 1) // 8) * 8  # every slot a query may need survives the step's writes
        buffers = [m.init_state(batch_size, device, dtype) for m in self._stream_modules]
        a = self.decoder_transformer.layers[0].self_attn
        kv = torch.zeros(
            len(self.decoder_transformer.layers),
            2,
            batch_size,
            a.num_kv_heads,
            capacity,
            a.head_dim,
            device=device,
            dtype=dtype,
        )
        kv_pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        fresh = torch.ones(batch_size, dtype=torch.bool, device=device)
        return CodecStreamState(buffers, kv, kv_pos, pos, fresh)

    @torch.no_grad()
    def decode_step(self, codes: Tensor, state: CodecStreamState) -> Tensor:
        """codes ``[B, K, n]`` (n = 1 usually) -> audio ``[B, n * frame_size]``; updates ``state``."""
        if codes.shape[0] != state.batch_size:
            raise ValueError(f"codes batch {codes.shape[0]} != state batch {state.batch_size}")
        if codes.shape[-1] * self.cfg.latent_stride > state.kv.shape[-2] - self.cfg.sliding_window + 1:
            raise ValueError("more frames per step than the state was sized for (max_frames_per_step)")
        h = self._dequantize(codes)
        if self.upsample is not None:
            h = self.upsample.step(h, state)
        h = self.decoder_transformer.step(h.transpose(1, 2), state).transpose(1, 2)
        audio = self.decoder.step(h, state)
        if self.cfg.pad_mode == "replicate":
            state.fresh.zero_()
        return self._squeeze(audio)

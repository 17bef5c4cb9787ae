"""The Reasoner's audio encoder (Qwen2.5-Omni, Whisper-style) with windowed attention.

An utterance's mel frames are cut into windows of ``2 * n_window`` frames. Each window goes through
the two convolutions on its own, gets sinusoidal positions counted from 0 and attends only within
itself, so a completed window can be encoded while the user is still speaking. The windows'
outputs are concatenated, average-pooled in pairs over the whole utterance, then ``ln_post``/``proj``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioEncoderConfig


def sinusoid_positions(
    length: int, channels: int, max_timescale: float = 10000.0, device: torch.device | None = None
) -> torch.Tensor:
    log_inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_inc * torch.arange(channels // 2, device=device).float())
    t = torch.arange(length, device=device)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def conv_output_frames(mel_frames: int) -> int:
    return (mel_frames - 1) // 2 + 1


def audio_token_count(mel_frames: int) -> int:
    """Reasoner embeddings (``<|AUDIO|>`` placeholders) for ``mel_frames`` valid mel frames.

    Zero for 1-2 frames (under 321 samples), as in the Qwen2.5-Omni processor.
    """
    if mel_frames < 1:
        raise ValueError(f"mel_frames must be at least 1, got {mel_frames}")
    return (conv_output_frames(mel_frames) - 2) // 2 + 1


class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class AudioEncoderLayer(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.self_attn = AudioAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            big = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-big, big)
        return x


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Kept for checkpoint compatibility; no Chroma path uses it.
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.output_dim)
        self.init_buffers()

    def init_buffers(self, device: torch.device | None = None) -> None:
        """(Re)compute the sinusoidal positions on ``device`` (derived, not saved)."""
        positions = sinusoid_positions(self.cfg.max_source_positions, self.cfg.d_model, device=device)
        self.register_buffer("positions", positions, persistent=False)

    @property
    def window(self) -> int:
        """Mel frames per attention window."""
        return 2 * self.cfg.n_window

    def encode_windows(self, mel: torch.Tensor) -> torch.Tensor:
        """Encode mel frames ``[n_mels, L]`` window by window, before pooling: ``[sum_w conv(len_w), d]``.

        Windows are encoded one at a time, so a window gives bit-identical output whether it is
        encoded as it arrives (streaming) or with the rest of the turn.
        """
        mel = mel.to(self.conv1.weight.dtype)
        w = self.window
        outs = [self._encode_batch(mel[None, :, i:i + w], None)[0] for i in range(0, mel.shape[-1], w)]
        return torch.cat(outs, dim=0)

    def _encode_batch(self, chunks: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = F.gelu(self.conv1(chunks))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positions[: x.shape[1]].to(x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool_project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Average-pool encoded frames ``[T, d]`` in pairs (an odd last frame is dropped), then project."""
        t = hidden.shape[0] // 2 * 2
        pooled = (hidden[0:t:2] + hidden[1:t:2]) / 2
        return self.proj(self.ln_post(pooled))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel features ``[n_mels, L]`` of one utterance -> ``[audio_token_count(L), output_dim]``."""
        return self.pool_project(self.encode_windows(mel))

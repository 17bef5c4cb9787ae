"""The user's turn audio on its way to the Reasoner: resampled to 16 kHz as a stream, log-mel features as it
arrives, 30 s windows encoded by the audio tower while the user still speaks, and each finished part's exact
whole-turn features and embeddings computed in background slices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..audio import HOP_LENGTH, StreamingMelExtractor, StreamResampler, normalize_log_mel
from ..constants import REASONER_SAMPLE_RATE
from ..models.audio_encoder import audio_token_count

#: A window of log-mel features and its encoded frames (``None`` until a background slice encodes it).
Window = list


def encode_window(tower, feats: torch.Tensor) -> torch.Tensor:
    p = tower.conv1.weight
    return tower.encode_windows(feats.to(p.device, p.dtype))


@dataclass(eq=False)
class PendingAudio:
    """A finished user audio part on its way to embeddings: its mel extractor and the windows encoded while
    the user spoke, then its final features and windows (``None`` entries still to encode), then ``embeds``."""

    tokens: int
    mel: StreamingMelExtractor | None
    windows: list | None
    feats: torch.Tensor | None = None
    outs: list[torch.Tensor | None] | None = None
    embeds: torch.Tensor | None = None

    def encode_slice(self, tower) -> None:
        """One slice: first the exact whole-turn features (windows encoded while the user spoke are kept where
        the final features equal theirs), then one window at a time, then the pooled embeddings."""
        w = tower.window
        if self.feats is None:
            feats = self.feats = self.mel.finalize()
            assert audio_token_count(feats.shape[1]) == self.tokens
            outs: list[torch.Tensor | None] = []
            for i, (used, out) in enumerate(self.windows):
                final = feats[:, i * w:(i + 1) * w]
                if out is None or final.shape != used.shape or not torch.equal(final, used):
                    break  # the turn's loudest frame moved the floor: this window and the rest are redone
                outs.append(out)
            self.outs = outs + [None] * (-(-feats.shape[1] // w) - len(outs))
            self.mel = self.windows = None
        else:
            i = self.outs.index(None)
            self.outs[i] = encode_window(tower, self.feats[:, i * w:(i + 1) * w])
        if None not in self.outs:
            embeds = tower.pool_project(torch.cat(self.outs, dim=0))
            assert embeds.shape[0] == self.tokens
            self.embeds = embeds


class TurnAudio:
    """The audio part the user is speaking: ``push`` audio as it arrives, ``finish`` it into a ``PendingAudio``.

    ``window`` is the audio tower's attention window in mel frames; each completed window is handed out (see
    ``push``) to be encoded between frames."""

    def __init__(self, window: int):
        self.window = window
        self._resampler: StreamResampler | None = None     # while the user's audio is not at 16 kHz
        self._reset()

    def _reset(self) -> None:
        self.mel = StreamingMelExtractor()
        self._raw: list[torch.Tensor] = []
        self._raw_frames = 0
        self.windows: list[Window] = []   # [features used, encoded frames or None]

    @property
    def seconds(self) -> float:
        """Seconds received since the part began (at 16 kHz, after resampling)."""
        return self.mel.num_samples / REASONER_SAMPLE_RATE

    @property
    def empty(self) -> bool:
        return self.mel.num_samples == 0 and self._resampler is None

    def push(self, wav: torch.Tensor, rate: int) -> list[Window]:
        """Add audio at ``rate``; returns the windows it completed (to encode in the background)."""
        if self._resampler is None or rate != self._resampler.in_rate:
            ready = self.flush()
            if rate != REASONER_SAMPLE_RATE:
                self._resampler = StreamResampler(rate, REASONER_SAMPLE_RATE)
        else:
            ready = []
        if self._resampler is not None:
            wav = torch.from_numpy(self._resampler.process(wav.numpy()))
        return ready + self._push_mel(wav)

    def flush(self) -> list[Window]:
        if self._resampler is None:
            return []
        tail = torch.from_numpy(self._resampler.flush())
        self._resampler = None
        return self._push_mel(tail)

    def _push_mel(self, wav16: torch.Tensor) -> list[Window]:
        if not wav16.numel():
            return []
        raw = self.mel.push(wav16)
        if raw.shape[1]:
            self._raw.append(raw)
            self._raw_frames += raw.shape[1]
        w = self.window
        if self._raw_frames < (len(self.windows) + 1) * w:
            return []
        raw = torch.cat(self._raw, dim=1)
        self._raw = [raw]
        peak = raw.max()
        ready = []
        while self._raw_frames >= (len(self.windows) + 1) * w:
            i = len(self.windows)
            self.windows.append([normalize_log_mel(raw[:, i * w:(i + 1) * w], peak), None])
            ready.append(self.windows[i])
        return ready

    def clear(self) -> None:
        """Drop the part: the resampler's buffered tail too (never flushed into the next turn)."""
        self._resampler = None
        self._reset()

    def finish(self) -> PendingAudio | None:
        """End the part: its token count now, its exact features and embeddings later (in background slices)."""
        self.flush()
        if self.mel.num_samples == 0:
            return None
        frames = -(-self.mel.num_samples // HOP_LENGTH)
        pending = PendingAudio(audio_token_count(frames), self.mel, self.windows)
        self._reset()   # the finished part keeps its extractor and windows; the next one starts afresh
        return pending


def warm_front_end() -> None:
    """Pay the audio front end's first-call costs now, not in a live stream."""
    mel = StreamingMelExtractor()
    mel.push(torch.zeros(REASONER_SAMPLE_RATE))
    mel.finalize()
    StreamResampler(44_100, REASONER_SAMPLE_RATE).process(np.zeros(441, np.float32))

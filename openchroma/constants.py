"""Rates and sizes fixed by Chroma's design, defined once; the rest of the code imports them from here.

The Reasoner hears 16 kHz audio through Whisper-style log-mel features; the Codec (Mimi) speaks 24 kHz
audio in frames of 1920 samples, 12.5 frames per second (80 ms each). A checkpoint's ``config.json`` also
states the codec's rate and frame size; these are the values the published model has (and the defaults
when a config leaves them out).
"""

from __future__ import annotations

#: Sample rate of the Reasoner's audio input (its Whisper-style feature extractor).
REASONER_SAMPLE_RATE = 16_000
#: Sample rate of the Codec's audio (the voice prompt and the generated speech).
CODEC_SAMPLE_RATE = 24_000
#: Codec frames (one code per codebook) per second.
FRAME_RATE_HZ = 12.5
#: Audio samples per Codec frame at ``CODEC_SAMPLE_RATE`` (80 ms).
FRAME_SAMPLES = 1920
#: Seconds per Codec frame.
FRAME_SECONDS = FRAME_SAMPLES / CODEC_SAMPLE_RATE

# Whisper log-mel features (WhisperFeatureExtractor with feature_size=128, as Qwen2.5-Omni configures it).
#: STFT size (25 ms at 16 kHz).
N_FFT = 400
#: STFT hop (10 ms at 16 kHz): one mel frame per hop.
HOP_LENGTH = 160
#: Mel bins.
N_MELS = 128
#: Whisper keeps log10 mel values within this of the clip's maximum (80 dB).
LOG_MEL_FLOOR = 8.0
#: Whisper's final scaling of the floored log10 values: ``(x + LOG_MEL_OFFSET) / LOG_MEL_SCALE``.
LOG_MEL_OFFSET = 4.0
LOG_MEL_SCALE = 4.0

#: Weight-only quantization schemes (``--quantize``): int8 and int4 on CPU and CUDA, fp8 on CUDA 8.9+.
QUANTIZE_SCHEMES = ("int8", "int4", "fp8")

"""The Codec (Mimi): parity with transformers' MimiModel, the chroma-tiny fixture, and streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openchroma.models.codec import Codec, CodecConfig

FIXTURE = Path("/work/shared/fixtures/chroma-tiny")
PREFIX = "codec_model."
FRAME = 1920

needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "model.safetensors").exists(), reason="chroma-tiny fixture missing"
)

# Fallback codec_config (the fixture's), so the HF-parity tests run without the fixture.
TINY_CODEC = {
    "_frame_rate": 12.5,
    "audio_channels": 1,
    "codebook_dim": 16,
    "codebook_size": 2048,
    "compress": 2,
    "dilation_growth_rate": 2,
    "head_dim": 16,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "kernel_size": 7,
    "last_kernel_size": 3,
    "max_position_embeddings": 8000,
    "model_type": "mimi",
    "norm_eps": 1e-05,
    "num_attention_heads": 2,
    "num_filters": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "num_quantizers": 8,
    "num_residual_layers": 1,
    "num_semantic_quantizers": 1,
    "pad_mode": "constant",
    "residual_kernel_size": 3,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "sampling_rate": 24000,
    "sliding_window": 250,
    "trim_right_ratio": 1.0,
    "upsample_groups": 32,
    "upsampling_ratios": [8, 6, 5, 4],
    "use_causal_conv": True,
    "use_conv_shortcut": False,
    "vector_quantization_hidden_dimension": 16,
}


def codec_config(**overrides) -> dict:
    path = FIXTURE / "config.json"
    d = json.loads(path.read_text())["codec_config"] if path.exists() else dict(TINY_CODEC)
    d.update(overrides)
    return d


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, relative to the reference's scale when that exceeds 1."""
    return (got.float() - ref.float()).abs().max().item() / max(1.0, ref.abs().max().item())


# Later transformers releases nest Mimi's halves (encoder.encoder_seanet.*, decoder.decoder_seanet.*, ...);
# the checkpoint (and our module) use the transformers 5.0 names.
_HF_NESTED = [
    ("encoder.layers.", "encoder.encoder_seanet.layers."),
    ("encoder_transformer.", "encoder.encoder_transformer."),
    ("downsample.", "encoder.downsample."),
    ("upsample.", "decoder.upsample."),
    ("decoder_transformer.", "decoder.decoder_transformer."),
    ("decoder.layers.", "decoder.decoder_seanet.layers."),
]


def hf_key(ours: str, hf_keys: set[str]) -> str:
    if ours in hf_keys:
        return ours
    for old, new in _HF_NESTED:
        if ours.startswith(old) and new + ours[len(old) :] in hf_keys:
            return new + ours[len(old) :]
    raise KeyError(ours)


def random_pair(cfg_dict: dict, seed: int = 0):
    """A random-weight transformers MimiModel and our Codec with the same weights (output scaled to ~1)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.MimiModel(transformers.MimiConfig(**cfg_dict)).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():  # HF initialises codebooks to zero
            if name.endswith("embed_sum"):
                buf.normal_()
            elif name.endswith("cluster_usage"):
                buf.uniform_(0.5, 2.0)
        for name, p in hf.named_parameters():  # exercise the transformers (layer scale init is 0.01)
            if name.endswith("layer_scale.scale"):
                p.uniform_(0.2, 1.0)
    hsd = hf.state_dict()
    ours = Codec(CodecConfig.from_dict(cfg_dict)).eval()
    ours.load_state_dict({k: hsd[hf_key(k, set(hsd))].clone() for k in ours.state_dict()})
    # Scale the last conv so audio is O(1), as real audio is, making 1e-5 a float32-meaningful tolerance.
    with torch.no_grad():
        codes = torch.randint(0, cfg_dict["codebook_size"], (1, 8, 6))
        peak = hf.decode(codes).audio_values.abs().max().item()
        for model in (hf, ours):
            last = model.decoder.layers[-1].conv if isinstance(model, Codec) else hf_last_conv(model)
            last.weight.div_(peak)
            last.bias.div_(peak)
    return hf, ours


def hf_last_conv(hf) -> torch.nn.Conv1d:
    seanet = getattr(hf.decoder, "decoder_seanet", hf.decoder)
    return seanet.layers[-1].conv


@pytest.fixture(scope="module")
def fixture_codec() -> Codec:
    if not (FIXTURE / "model.safetensors").exists():
        pytest.skip("chroma-tiny fixture missing")
    from safetensors.torch import load_file

    sd = load_file(str(FIXTURE / "model.safetensors"))
    codec = Codec(CodecConfig.from_dict(codec_config())).eval()
    codec.load_state_dict({k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)})
    return codec


# ----------------------------------------------------------------------------------------------------


def test_config_from_dict():
    cfg = CodecConfig.from_dict(codec_config())
    assert cfg.frame_size == FRAME and cfg.latent_stride == 2 and cfg.encodec_frame_rate == 25
    assert cfg.frame_rate == 12.5 and cfg.rope_theta == 10000.0 and cfg.head_dim == 16
    default = CodecConfig()  # Kyutai's Mimi
    assert default.frame_size == FRAME and default.head_dim == 64


@needs_fixture
def test_state_dict_keys_are_checkpoint_keys():
    from safetensors import safe_open

    with safe_open(str(FIXTURE / "model.safetensors"), "pt") as f:
        ckpt = {k[len(PREFIX) :]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(PREFIX)}
    codec = Codec(CodecConfig.from_dict(codec_config()))
    ours = {k: tuple(v.shape) for k, v in codec.state_dict().items()}
    assert ours == ckpt


@pytest.mark.parametrize("window", [250, 8])
def test_matches_transformers(window: int):
    torch.manual_seed(1)
    hf, ours = random_pair(codec_config(sliding_window=window), seed=window)
    lengths = [1000, 3 * FRAME, 7 * FRAME + 700] if window == 250 else [9 * FRAME + 123]
    with torch.no_grad():
        for T in lengths:
            audio = 0.1 * torch.randn(2, T)
            ref_codes = hf.encode(audio[:, None], num_quantizers=8).audio_codes
            codes = ours.encode(audio)
            assert codes.dtype == torch.int64 and codes.shape == (2, 8, -(-T // FRAME))
            assert torch.equal(codes, ref_codes)
            ref_audio = hf.decode(ref_codes).audio_values[:, 0]
            got = ours.decode(ref_codes)
            assert got.shape == (2, ref_codes.shape[-1] * FRAME)
            assert rel_err(got, ref_audio) <= 1e-5


@pytest.mark.slow   # three more codec configurations
@pytest.mark.parametrize(
    "overrides",
    [
        {"pad_mode": "replicate"},
        {"num_key_value_heads": 1},
        {"use_conv_shortcut": True, "num_residual_layers": 2},
    ],
    ids=["replicate", "gqa", "shortcut"],
)
def test_config_variants(overrides: dict):
    """Less common config switches: parity with transformers and streaming = one-shot."""
    hf, ours = random_pair(codec_config(sliding_window=8, **overrides), seed=11)
    torch.manual_seed(12)
    audio = 0.1 * torch.randn(1, 9 * FRAME + 5)
    with torch.no_grad():
        ref_codes = hf.encode(audio[:, None], num_quantizers=8).audio_codes
        assert torch.equal(ours.encode(audio), ref_codes)
        ref_audio = hf.decode(ref_codes).audio_values[:, 0]
    got = ours.decode(ref_codes)
    assert rel_err(got, ref_audio) <= 1e-5
    assert rel_err(_stream(ours, ref_codes), got) <= 1e-5


@needs_fixture
@pytest.mark.parametrize("case", ["speech_turn", "text_turn", "long_prompt", "forced_text"])
def test_fixture_cases(fixture_codec: Codec, case: str):
    from safetensors.torch import load_file

    c = load_file(str(FIXTURE / f"case_{case}.safetensors"))
    codes = fixture_codec.encode(c["prompt_audio"][None])
    assert torch.equal(codes[0].T, c["prompt_codes"])
    expected = c["expected_audio"]
    audio = fixture_codec.decode(c["expected_codes"].T[None])[0]
    assert audio.shape == expected.shape
    assert (audio - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def _stream(codec: Codec, codes: torch.Tensor, **state_kw) -> torch.Tensor:
    state = codec.stream_state(codes.shape[0], **state_kw)
    return torch.cat(
        [codec.decode_step(codes[:, :, f : f + 1], state) for f in range(codes.shape[-1])], dim=-1
    )


def test_streaming_matches_decode():
    codec = random_pair(codec_config(sliding_window=8), seed=3)[1]
    torch.manual_seed(4)
    codes = torch.randint(0, 2048, (2, 8, 10))  # 20 transformer positions > window 8
    ref = codec.decode(codes)
    assert rel_err(_stream(codec, codes), ref) <= 1e-5
    # several frames per call
    state = codec.stream_state(2, max_frames_per_step=3)
    got = torch.cat([codec.decode_step(codes[:, :, f : f + 3], state) for f in range(0, 10, 3)], dim=-1)
    assert rel_err(got, ref) <= 1e-5
    with pytest.raises(ValueError):  # more frames than the ring cache was sized for
        codec.decode_step(codes[:, :, :5], codec.stream_state(2))


@pytest.mark.slow   # streaming twice over
def test_streaming_reset_rows():
    codec = random_pair(codec_config(sliding_window=8), seed=5)[1]
    torch.manual_seed(6)
    a = torch.randint(0, 2048, (1, 8, 12))
    b = torch.randint(0, 2048, (1, 8, 12))
    c = torch.randint(0, 2048, (1, 8, 7))
    state = codec.stream_state(2)
    out0, out1 = [], []
    for f in range(12):
        if f == 5:
            state.reset(torch.tensor([False, True]))  # row 1 starts a new conversation
        row1 = b[:, :, f : f + 1] if f < 5 else c[:, :, f - 5 : f - 4]
        y = codec.decode_step(torch.cat([a[:, :, f : f + 1], row1]), state)
        out0.append(y[0])
        out1.append(y[1])
    assert rel_err(torch.cat(out0), codec.decode(a)[0]) <= 1e-5
    assert rel_err(torch.cat(out1[:5]), codec.decode(b[:, :, :5])[0]) <= 1e-5
    assert rel_err(torch.cat(out1[5:]), codec.decode(c)[0]) <= 1e-5
    assert state.pos.tolist() == [24, 14]
    # reset by index, all rows back to the start
    state.reset([0, 1])
    y = torch.cat([codec.decode_step(a[:, :, f : f + 1].expand(2, -1, -1), state) for f in range(3)], dim=-1)
    assert rel_err(y, codec.decode(a[:, :, :3]).expand(2, -1)) <= 1e-5


@needs_fixture
def test_fixture_streaming(fixture_codec: Codec):
    from safetensors.torch import load_file

    c = load_file(str(FIXTURE / "case_text_turn.safetensors"))
    codes = c["expected_codes"].T[None]
    assert rel_err(_stream(fixture_codec, codes), fixture_codec.decode(codes)) <= 1e-5


def test_reduced_precision_runs():
    codec = random_pair(codec_config(sliding_window=8), seed=7)[1]
    codes = torch.randint(0, 2048, (1, 8, 6))
    ref = codec.decode(codes)
    codec = codec.to(torch.bfloat16)
    assert codec.decoder_transformer.inv_freq.dtype == torch.float32
    got = _stream(codec, codes)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) < 0.1


def test_meta_init_and_assign_load():
    """Built on the meta device and loaded with assign=True, derived buffers are rebuilt from the weights."""
    codec = random_pair(codec_config(sliding_window=8), seed=9)[1]
    codes = torch.randint(0, 2048, (1, 8, 4))
    with torch.device("meta"):
        lazy = Codec(codec.cfg)
    lazy.load_state_dict(codec.state_dict(), assign=True)
    assert lazy.decode_table.device.type == "cpu" and lazy.decoder_transformer.inv_freq.device.type == "cpu"
    assert torch.equal(lazy.decode(codes), codec.decode(codes))

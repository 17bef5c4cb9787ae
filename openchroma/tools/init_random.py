"""Write a random-weight Chroma checkpoint in the published layout.

For tests, plumbing demos and benchmarks where the real weights cannot be had. Such a model speaks
noise: its tokens and audio mean nothing, but every shape, name and code path is the real one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import ChromaConfig
from ..models.chroma import ChromaModel

PRESETS = ("tiny", "small", "chroma-4b")
#: config.json key init-random sets, so speak/chat/serve can default to short demos and label the noise.
RANDOM_WEIGHTS_KEY = "openchroma_random_weights"
#: Default response length (seconds) for random-weight checkpoints: noise needs no minute-long answers.
RANDOM_DEMO_SECONDS = 4.0

_SPECIAL = {
    "im_end_token_id": 151645,
    "text_start_token_id": 151665,
    "text_end_token_id": 151666,
    "codebook_eos_token_id": 0,
    "codebook_pad_token_id": 2050,
    "audio_num_codebooks": 8,
    "audio_frame_freq": 1920,
}


def _llama(hidden, layers, heads, kv, head_dim, mlp, rope, max_pos, eps=1e-5, extra=None):
    d = {
        "attention_bias": False, "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": mlp,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": head_dim, "rms_norm_eps": eps, "rope_parameters": rope, "max_position_embeddings": max_pos,
        "mlp_bias": False, "vocab_size": 2051, "audio_num_codebooks": 8, "use_cache": True,
    }
    d.update(extra or {})
    return d


def _mimi(hidden, filters, layers, heads, head_dim, mlp, codebook_dim, quantizers):
    return {
        "model_type": "mimi", "audio_channels": 1, "sampling_rate": 24000, "_frame_rate": 12.5,
        "hidden_size": hidden, "num_filters": filters, "num_residual_layers": 1, "upsampling_ratios": [8, 6, 5, 4],
        "kernel_size": 7, "last_kernel_size": 3, "residual_kernel_size": 3, "dilation_growth_rate": 2,
        "use_causal_conv": True, "pad_mode": "constant", "compress": 2, "trim_right_ratio": 1.0,
        "codebook_size": 2048, "codebook_dim": codebook_dim, "num_quantizers": quantizers,
        "num_semantic_quantizers": 1, "upsample_groups": hidden, "vector_quantization_hidden_dimension": codebook_dim,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "head_dim": head_dim, "intermediate_size": mlp, "hidden_act": "gelu", "max_position_embeddings": 8000,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "sliding_window": 250,
        "layer_scale_initial_scale": 0.01, "norm_eps": 1e-5, "attention_bias": False, "use_conv_shortcut": False,
        "use_cache": False, "use_streaming": False,
    }


def preset_config(preset: str) -> dict:
    """The ``config.json`` of a preset: ``chroma-4b`` has the published sizes."""
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    default_rope = {"rope_type": "default", "rope_theta": 500000.0}
    if preset == "tiny":
        text = dict(hidden=32, layers=2, heads=2, kv=1, mlp=64)
        audio = dict(d_model=32, layers=2, heads=2, ffn=64, n_window=50)
        backbone = _llama(32, 2, 2, 1, 16, 64, llama3, 2048)
        decoder = _llama(32, 2, 2, 1, 16, 64, default_rope, 33, extra={"audio_embedding_dim": 32})
        codec = _mimi(32, 4, 2, 2, 16, 64, 16, 8)
    elif preset == "small":
        text = dict(hidden=256, layers=4, heads=4, kv=2, mlp=768)
        audio = dict(d_model=256, layers=4, heads=4, ffn=1024, n_window=100)
        backbone = _llama(256, 4, 4, 2, 64, 768, llama3, 2048)
        decoder = _llama(128, 2, 4, 2, 32, 384, default_rope, 33, extra={"audio_embedding_dim": 256})
        codec = _mimi(128, 16, 2, 4, 32, 512, 64, 8)
    elif preset == "chroma-4b":
        text = dict(hidden=2048, layers=36, heads=16, kv=2, mlp=11008)
        audio = dict(d_model=1280, layers=32, heads=20, ffn=5120, n_window=100)
        backbone = _llama(2048, 16, 32, 8, 64, 8192, llama3, 2048)
        decoder = _llama(1024, 4, 8, 2, 128, 8192, default_rope, 33, extra={"audio_embedding_dim": 2048})
        codec = _mimi(512, 64, 8, 8, 64, 2048, 256, 32)
    else:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    backbone["model_type"] = "chroma_backbone"
    decoder["model_type"] = "chroma_decoder"
    h = text["hidden"]
    thinker = {
        "model_type": "qwen2_5_omni_thinker",
        "audio_token_index": 151646, "audio_start_token_id": 151647, "audio_end_token_id": 151648,
        "image_token_index": 151655, "video_token_index": 151656, "user_token_id": 872,
        "position_id_per_seconds": 25, "seconds_per_chunk": 2,
        "text_config": {
            "model_type": "qwen2_5_omni_text", "hidden_act": "silu", "hidden_size": h,
            "intermediate_size": text["mlp"], "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"], "num_key_value_heads": text["kv"],
            "head_dim": h // text["heads"], "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "type": "default", "rope_theta": 1000000.0,
                                "mrope_section": [h // text["heads"] // 8, 3 * h // text["heads"] // 16,
                                                  3 * h // text["heads"] // 16]},
            "vocab_size": 151936, "tie_word_embeddings": False, "use_sliding_window": False,
        },
        "audio_config": {
            "model_type": "qwen2_5_omni_audio_encoder", "d_model": audio["d_model"],
            "encoder_layers": audio["layers"], "num_hidden_layers": audio["layers"],
            "encoder_attention_heads": audio["heads"], "encoder_ffn_dim": audio["ffn"], "num_mel_bins": 128,
            "output_dim": h, "n_window": audio["n_window"], "max_source_positions": 1500,
            "activation_function": "gelu", "scale_embedding": False,
        },
    }
    return {
        "architectures": ["ChromaForConditionalGeneration"], "model_type": "chroma",
        "thinker_config": thinker, "backbone_config": backbone, "decoder_config": decoder,
        "codec_config": codec, "dtype": "bfloat16" if preset == "chroma-4b" else "float32",
        "tie_word_embeddings": True, **copy.deepcopy(_SPECIAL),
    }


# ----- complete configs: every key the published configuration writes -------------------------------------
# The published code builds the thinker's vision tower from ``thinker_config.vision_config`` and reads the
# vision token ids, although no Chroma path uses them; a config without them does not run there.
_VISION_TOKEN_IDS = {"vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654}
_PRETRAINED_DEFAULTS = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bos_token_id": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "dtype": None, "eos_token_id": None, "finetuning_task": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "output_attentions": False, "output_hidden_states": False, "pad_token_id": None, "prefix": None,
    "problem_type": None, "return_dict": True, "sep_token_id": None, "task_specific_params": None,
    "tie_encoder_decoder": False, "tokenizer_class": None, "initializer_range": 0.02,
}


def _vision_config(text_hidden: int, published: bool) -> dict:
    """Qwen2.5-Omni's vision encoder config: the 3B thinker's sizes, or a 1-layer stand-in at test sizes."""
    if published:
        sizes = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                     fullatt_block_indexes=[7, 15, 23, 31])
    else:
        sizes = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[0])
    return {**_PRETRAINED_DEFAULTS, "model_type": "qwen2_5_omni_vision_encoder", "hidden_act": "silu",
            "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 112, "out_hidden_size": text_hidden, "tie_word_embeddings": True, **sizes}


def complete_config(config: dict) -> dict:
    """``config`` with every key the published configuration carries added where missing (values kept)."""
    d = copy.deepcopy(config)
    th = d.setdefault("thinker_config", {})
    text = th.get("text_config", {})
    hidden = int(text.get("hidden_size", 2048))
    for k, v in _VISION_TOKEN_IDS.items():
        th.setdefault(k, v)
    th.setdefault("initializer_range", 0.02)
    th.setdefault("vision_config", _vision_config(hidden, published=hidden >= 2048))
    layers = int(text.get("num_hidden_layers", 1))
    text_defaults = {**_PRETRAINED_DEFAULTS, "attention_dropout": 0.0, "layer_types": ["full_attention"] * layers,
                     "max_window_layers": 28, "sliding_window": None, "use_cache": True}
    audio_defaults = {**_PRETRAINED_DEFAULTS, "activation_dropout": 0, "attention_dropout": 0, "dropout": 0,
                      "tie_word_embeddings": True}
    for section, defaults in (("text_config", text_defaults), ("audio_config", audio_defaults)):
        for k, v in defaults.items():
            th.setdefault(section, {}).setdefault(k, copy.deepcopy(v))
    for section in ("backbone_config", "decoder_config", "codec_config"):
        for k, v in {"attention_dropout": 0.0, "initializer_range": 0.02}.items():
            d.setdefault(section, {}).setdefault(k, v)
    d.setdefault("transformers_version", "5.0.0rc0")
    return d


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    last = name.rsplit(".", 1)[-1]
    if last == "bias" or name.endswith(("initialized",)):
        t = torch.zeros(shape) if last == "bias" else torch.ones(shape)
    elif "norm" in name and last == "weight" or name.endswith("layer_scale.scale"):
        t = torch.ones(shape) if "norm" in name else torch.full(shape, 0.01)
    elif name.endswith("cluster_usage"):
        t = torch.ones(shape)
    else:
        t = torch.randn(shape, generator=gen) * 0.02
        if name.endswith("embed_sum"):
            t = t * 50  # codebook vectors of a plausible scale
    return t.to(dtype)


def read_config_file(path: str | Path) -> dict:
    """A ``config.json`` in the published layout (sizes to build random weights for), checked before any work."""
    path = Path(path)
    try:
        cfg_dict = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None
    try:
        ChromaConfig.from_dict(cfg_dict)
    except Exception as e:
        raise ValueError(f"{path}: not a Chroma config ({type(e).__name__}: {e})") from None
    return cfg_dict


def write_random_checkpoint(
    preset: str | None,
    out_dir: str | Path,
    seed: int = 0,
    shard_bytes: int = 2 << 30,
    progress: bool = True,
    config: dict | None = None,
) -> Path:
    """Write ``config.json``, safetensors shards (+ index when sharded) and a tokenizer to ``out_dir``.

    Sizes come from ``preset``, or from ``config`` (a ``config.json`` dict in the published layout)."""
    from ..tokenizer import write_test_tokenizer

    if (preset is None) == (config is None):
        raise ValueError("give either a preset or a config")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = copy.deepcopy(config) if config is not None else preset_config(preset)
    preset = preset or "config"
    cfg = ChromaConfig.from_dict(cfg_dict)
    dtype = torch.bfloat16 if cfg_dict.get("dtype", cfg_dict.get("torch_dtype")) == "bfloat16" else torch.float32
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ChromaModel(cfg).state_dict().items()}
    shapes.pop("thinker.lm_head.weight", None)  # tied to embed_tokens: stored once
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names = []
    bar = tqdm(shapes.items(), desc=f"Writing {preset}", unit="tensor", disable=not progress)
    n_files = 0
    weight_map: dict[str, str] = {}

    total_bytes = 0

    def flush() -> None:
        nonlocal n_files, size
        if not shards[-1]:
            return
        n_files += 1
        tmp_name = f"shard-{n_files:05d}.safetensors"
        save_file(shards[-1], str(out / tmp_name), metadata={"format": "pt"})
        names.append(tmp_name)
        for k in shards[-1]:
            weight_map[k] = tmp_name
        shards[-1] = {}
        size = 0

    for name, shape in bar:
        t = _random_tensor(name, shape, gen, dtype)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shards[-1][name] = t
        size += nbytes
        total_bytes += nbytes
    flush()
    # Published names: model.safetensors alone, or model-0000i-of-0000n.safetensors with an index.
    if len(names) == 1:
        (out / names[0]).rename(out / "model.safetensors")
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        final = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
        for n, f in final.items():
            (out / n).rename(out / f)
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {k: final[v] for k, v in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps({**complete_config(cfg_dict), RANDOM_WEIGHTS_KEY: True}, indent=2))
    write_test_tokenizer(out)
    (out / "README.md").write_text(
        f"# Random-weight Chroma checkpoint ({preset})\n\nWritten by `openchroma init-random --preset {preset}` "
        f"with seed {seed}. The weights are random: this model speaks noise. It exists to exercise the "
        "real code paths (loading, generation, serving, benchmarks) where the published weights cannot be had.\n"
    )
    return out


def is_random_checkpoint(model: str | Path) -> bool:
    """Whether ``model`` is a local directory written by init-random (its config.json says so; older ones are
    known by the README init-random writes). Hub ids and unreadable directories count as real weights."""
    path = Path(model).expanduser()
    try:
        if json.loads((path / "config.json").read_text()).get(RANDOM_WEIGHTS_KEY):
            return True
        return (path / "README.md").read_text().startswith("# Random-weight Chroma checkpoint")
    except (OSError, ValueError, AttributeError):
        return False

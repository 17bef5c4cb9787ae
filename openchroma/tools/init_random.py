"""Write a random-weight Chroma checkpoint in the published layout, with a small real tokenizer.

For tests, plumbing demos and benchmarks where the real weights cannot be had. Such a model speaks
noise: its tokens and audio mean nothing, but every shape, name and code path is the real one. The
tokenizer (``write_test_tokenizer``) is a byte-level BPE trained on a built-in text, with Qwen2.5-Omni's
special tokens at their published ids.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from ..config import RANDOM_WEIGHTS_KEY, ChromaConfig
from ..constants import CODEC_SAMPLE_RATE, FRAME_RATE_HZ, FRAME_SAMPLES
from ..models.chroma import ChromaModel
from ..tokenizer import TEXT_END_ID, TEXT_START_ID

PRESETS = ("tiny", "small", "chroma-4b")

_SPECIAL = {
    "im_end_token_id": 151645,
    "text_start_token_id": 151665,
    "text_end_token_id": 151666,
    "codebook_eos_token_id": 0,
    "codebook_pad_token_id": 2050,
    "audio_num_codebooks": 8,
    "audio_frame_freq": FRAME_SAMPLES,
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
        "model_type": "mimi", "audio_channels": 1, "sampling_rate": CODEC_SAMPLE_RATE, "_frame_rate": FRAME_RATE_HZ,
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
    reasoner = {
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
        "thinker_config": reasoner, "backbone_config": backbone, "decoder_config": decoder,
        "codec_config": codec, "dtype": "bfloat16" if preset == "chroma-4b" else "float32",
        "tie_word_embeddings": True, **copy.deepcopy(_SPECIAL),
    }


# ----- complete configs: every key the published configuration writes -------------------------------------
# The published code builds the Reasoner's vision tower from ``thinker_config.vision_config`` and reads the
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
    """Qwen2.5-Omni's vision encoder config: the 3B Reasoner's sizes, or a 1-layer stand-in at test sizes."""
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


# ----------------------------------------------------------------------------------------------------------
# The test tokenizer
# ----------------------------------------------------------------------------------------------------------

#: Added tokens of the Qwen2.5-Omni tokenizer (``added_tokens_decoder`` of Qwen/Qwen2.5-Omni-3B).
QWEN_OMNI_ADDED_TOKENS: dict[int, str] = {
    151643: "<|endoftext|>",
    151644: "<|im_start|>",
    151645: "<|im_end|>",
    151646: "<|AUDIO|>",
    151647: "<|audio_bos|>",
    151648: "<|audio_eos|>",
    151649: "<|box_end|>",
    151650: "<|quad_start|>",
    151651: "<|quad_end|>",
    151652: "<|vision_bos|>",
    151653: "<|vision_eos|>",
    151654: "<|vision_pad|>",
    151655: "<|IMAGE|>",
    151656: "<|VIDEO|>",
    151657: "<tool_call>",
    151658: "</tool_call>",
    151659: "<|fim_prefix|>",
    151660: "<|fim_middle|>",
    151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>",
    151663: "<|repo_name|>",
    151664: "<|file_sep|>",
}
#: Chroma's prompt-text delimiters (``text_start_token_id`` / ``text_end_token_id``). The released
#: Qwen2.5-Omni tokenizer has no tokens at these ids (its last one is 151664): Chroma uses the embedding rows
#: directly.
#: The test tokenizer names them so that they can be written and read back.
CHROMA_ADDED_TOKENS: dict[int, str] = {TEXT_START_ID: "<|text_start|>", TEXT_END_ID: "<|text_end|>"}

#: The Qwen2.5-Omni chat template (``chat_template.json`` of Qwen/Qwen2.5-Omni-3B).
QWEN_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Qwen2 pre-tokenizer split (``transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX``).
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _qwen2_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> models.BPE:
    return models.BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )


def _added_token_json(token_id: int, content: str, special: bool = True) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _with_added_tokens(tokenizer_json: dict[str, Any], added: Mapping[int, tuple[str, bool]]) -> Tokenizer:
    """Place ``added`` tokens at their exact ids.

    ``tokenizers`` keeps the id of an added token that is also in the model vocabulary (a BPE vocabulary may
    have gaps) but renumbers the others, so the tokens go into both.
    """
    vocab = tokenizer_json["model"]["vocab"]
    taken = {i: t for t, i in vocab.items()}
    for token_id, (content, _) in added.items():
        if taken.get(token_id, content) != content:
            raise ValueError(f"id {token_id} of added token {content!r} is taken by {taken[token_id]!r}")
        vocab[content] = token_id
    tokenizer_json["added_tokens"] = [
        _added_token_json(i, content, special) for i, (content, special) in sorted(added.items())
    ]
    return Tokenizer.from_str(json.dumps(tokenizer_json, ensure_ascii=False))


_TRAINING_TEXT = """\
Hello! How are you doing today? I am doing well, thank you for asking.
This is a small conversation between a person and a voice assistant that can listen and speak.
The assistant hears what the user says, thinks about it, and then answers with a natural voice.
Can you tell me what the weather will be like tomorrow morning? It should be sunny and warm.
Please speak a little more slowly, and use a calm and friendly tone of voice.
What time is it right now? It is a quarter past three in the afternoon.
I would like to book a table for two people at seven o'clock this evening.
Of course. I have reserved a table for two at seven. Is there anything else I can help with?
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
We are testing the streaming speech pipeline: audio comes in, text and speech come out.
Numbers like 1, 2, 3, 42, 100 and 2025 are written with digits; words like one and two are not.
She said, "That's wonderful news!" and we all laughed together for a long while.
They've been working on the new model for months, and it's finally ready to be tested.
Let's talk about music, books, movies, travel, food, and the things that make people happy.
The sound of the ocean at night is quiet, deep, and steady, like a slow breathing rhythm.
Could you repeat that, please? I didn't quite catch the last part of what you said.
Thank you very much for your help today. You're welcome, have a nice day and talk to you soon!
In the beginning there was only silence, and then a voice started to speak about the world.
Every morning the small town wakes up early, the bakery opens, and the streets fill with people.
Good morning, good afternoon, good evening, and good night to everyone who is listening.
The children were playing in the garden while their parents were talking about the holidays.
A good story has a beginning, a middle and an ending, and the best ones are told out loud.
When the train arrived at the station, the passengers were waiting with their bags and coats.
Listening carefully is the most important thing in a conversation; speaking comes second.
Remember to drink water, take a short walk, and rest your eyes after working for a long time.
The recording was clear, the speaker was confident, and the questions were answered quickly.
How many minutes does it take to walk from the station to the museum? About fifteen minutes.
Would you like some coffee or tea? I would love a cup of tea with a little milk, thank you.
"""


def _train_test_bpe(vocab_size: int) -> dict[str, Any]:
    tokenizer = _qwen2_pipeline(Tokenizer(_bpe({}, [])))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = _TRAINING_TEXT.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return json.loads(tokenizer.to_str())


def write_test_tokenizer(out_dir: str | Path, *, vocab_size: int = 768) -> Path:
    """Write a small byte-level BPE tokenizer with Qwen2.5-Omni's special tokens at their published ids.

    The 256 byte tokens and up to ``vocab_size - 256`` merges are learned (deterministically) from a built-in
    English text; the 22 Qwen2.5-Omni added tokens sit at 151643-151664 and Chroma's ``<|text_start|>`` /
    ``<|text_end|>`` at 151665/151666. Writes ``tokenizer.json`` and ``tokenizer_config.json`` (with the
    Qwen2.5-Omni chat template) so that ``ChatTokenizer.from_dir`` and ``transformers.AutoTokenizer`` load it
    with the same ids. Returns the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _train_test_bpe(vocab_size)
    added = {i: (t, True) for i, t in {**QWEN_OMNI_ADDED_TOKENS, **CHROMA_ADDED_TOKENS}.items()}
    tokenizer = _with_added_tokens(tokenizer_json, added)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=False), encoding="utf-8")

    def tok(token_id: int) -> str:
        return QWEN_OMNI_ADDED_TOKENS[token_id]

    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token_json(i, content, special).items() if k != "id"}
            for i, (content, special) in sorted(added.items())
        },
        "additional_special_tokens": [
            tok(i)
            for i in (
                151644,
                151645,
                151646,
                151647,
                151648,
                151649,
                151650,
                151651,
                151652,
                151653,
                151654,
                151655,
                151656,
            )
        ],
        "extra_special_tokens": {
            "image_token": tok(151655),
            "audio_token": tok(151646),
            "video_token": tok(151656),
            "vision_bos_token": tok(151652),
            "vision_eos_token": tok(151653),
            "audio_bos_token": tok(151647),
            "audio_eos_token": tok(151648),
        },
        "bos_token": None,
        "chat_template": QWEN_OMNI_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a complete random-weight checkpoint directory in the published layout. Its speech is "
                     "noise: it exists to run every command without the real weights.")
    sizes = p.add_mutually_exclusive_group(required=True)
    sizes.add_argument("--preset", choices=["tiny", "small", "chroma-4b"],
                       help="sizes: tiny (tests), small (CPU demos), chroma-4b (the published sizes)")
    sizes.add_argument("--config", metavar="FILE",
                       help="sizes from a config.json in the published layout (e.g. ../shared/perf/chroma-mid/"
                            "config.json: the published widths with few layers)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    config = read_config_file(args.config) if args.config else None
    out = write_random_checkpoint(args.preset, args.out, seed=args.seed, config=config)
    sizes = f"'{args.preset}'" if args.preset else f"{args.config}-sized"
    print(f"wrote a random-weight {sizes} checkpoint to {out} (it speaks noise: for tests and benchmarks)")
    return 0

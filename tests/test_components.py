"""Our modules against transformers' reference implementations, on random weights."""

from __future__ import annotations

import pytest
import torch

from openchroma.config import AudioEncoderConfig, RopeConfig, TransformerConfig
from openchroma.models.audio_encoder import AudioEncoder, audio_token_count
from openchroma.models.transformer import Transformer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("n_window", [50, pytest.param(7, marks=pytest.mark.slow)])   # 7: many windows, slow
def test_audio_encoder_matches_qwen2_5_omni(n_window):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    hf_cfg = Qwen2_5OmniAudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                                           num_mel_bins=128, output_dim=24, n_window=n_window,
                                           max_source_positions=1500)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Qwen2_5OmniAudioEncoder(hf_cfg).eval()
    ours = AudioEncoder(AudioEncoderConfig.from_dict(hf_cfg.to_dict(), "test")).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for length in (400, 250, 101, 37):
        mel = torch.randn(128, length)
        with torch.no_grad():
            want = ref(mel, feature_lens=torch.tensor([length])).last_hidden_state
            got = ours(mel)
        assert got.shape == (audio_token_count(length), 24) == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _copy_llama_like(ours: Transformer, hf_model) -> None:
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items() if not k.startswith("lm_head")}
    if not hasattr(ours, "embed_tokens"):
        sd.pop("embed_tokens.weight")
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]


def test_text_decoder_matches_qwen2_with_cache():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(hf_cfg).eval()
    cfg = TransformerConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, rms_norm_eps=1e-6, rope=RopeConfig(theta=1e6), max_position_embeddings=128,
                            vocab_size=1000, qkv_bias=True)
    ours = Transformer(cfg, with_embedding=True).eval()
    _copy_llama_like(ours, ref)
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        want = ref(ids).logits
        cache = ours.new_cache(1, 32)
        # Prefill 12 tokens, then one at a time: the cached path must equal the full forward.
        h = [ours(ours.embed_tokens(ids[:, :12]), torch.arange(12)[None], cache, kv_len=12)]
        for t in range(12, 20):
            h.append(ours(ours.embed_tokens(ids[:, t:t + 1]), torch.tensor([[t]]), cache, kv_len=t + 1))
        got = torch.cat(h, dim=1) @ ref.lm_head.weight.T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_backbone_matches_llama_with_llama3_rope():
    from transformers import LlamaConfig, LlamaModel

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                         rope_parameters=rope, max_position_embeddings=16384)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = LlamaModel(hf_cfg).eval()
    cfg = TransformerConfig.from_dict(hf_cfg.to_dict(), "test")
    assert cfg.rope.rope_type == "llama3"
    ours = Transformer(cfg).eval()
    _copy_llama_like(ours, ref)
    # Positions past the original context exercise every llama3 frequency band.
    x = torch.randn(1, 40, 64)
    pos = torch.arange(3000, 3040)[None]
    with torch.no_grad():
        want = ref(inputs_embeds=x, position_ids=pos).last_hidden_state
        cache = ours.new_cache(1, 40)
        got = ours(x, pos, cache, torch.arange(40)[None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_batched_rows_at_different_positions_match_single_rows():
    cfg = TransformerConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, rms_norm_eps=1e-5, rope=RopeConfig(theta=1e4), max_position_embeddings=64,
                            vocab_size=0)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    xs = [torch.randn(1, n, 32) for n in (5, 9)]
    with torch.no_grad():
        singles = []
        for x in xs:
            c = model.new_cache(1, 16)
            singles.append(model(x, torch.arange(x.shape[1])[None], c)[0, -1])
        # Batch: prefill each row in its own slot, then step both rows together at different positions.
        c = model.new_cache(2, 16)
        for row, x in enumerate(xs):
            n = x.shape[1] - 1
            one = model.new_cache(1, 16)
            model(x[:, :n], torch.arange(n)[None], one)
            c.copy_rows_(row, one, 0, n)
        last = torch.cat([x[:, -1:] for x in xs])
        pos = torch.tensor([[4], [8]])
        got = model(last, pos, c)[:, 0]
    torch.testing.assert_close(got[0], singles[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], singles[1], atol=1e-5, rtol=1e-5)

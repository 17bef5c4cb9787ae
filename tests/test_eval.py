"""``openchroma eval`` and its metrics, checked on real speech made with eSpeak NG and on an init-random model.

SIM uses resemblyzer and WER PocketSphinx: both ship their weights in their PyPI packages, so these tests run
offline. A random-weight model speaks noise, so its run is checked for the report's plumbing, not its scores.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from openchroma.cli import main

# find_spec, not importorskip: importing resemblyzer needs the stand-in that openchroma.eval.speaker provides.
if any(importlib.util.find_spec(m) is None for m in ("resemblyzer", "pocketsphinx", "jiwer")):
    pytest.skip("the eval extra is not installed (pip install -e '.[eval]')", allow_module_level=True)
# Tests that make real speech need the espeak-ng program; the others run without it.
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")

from openchroma.eval.espeak import PROMPT_TEXT, SENTENCES, speak, write_wav  # noqa: E402
from openchroma.eval.speaker import cosine_similarity, load_speaker_model  # noqa: E402

OFFLINE = ["--sim-model", "resemblyzer", "--asr-model", "pocketsphinx", "--no-progress"]
SPEECH_WAV = Path(__file__).parent / "data" / "speech.wav"
# Audibly different espeak-ng voices: two female, three male, different accents and synthesisers.
SIM_VOICES = ("en-us+f2", "en-us+klatt2", "en-us+m3", "en-gb-scotland+f4", "en-us+m7")
# PocketSphinx recognises these voices best (WER around 0.3 on their own text; other voices are worse).
WER_VOICES = ("en-us+f2", "en-us+f5")


@pytest.fixture(scope="module")
def embedder():
    return load_speaker_model("resemblyzer")


@pytest.mark.slow   # speaker embeddings of a whole test set
@needs_espeak
def test_sim_same_espeak_voice_beats_other_voices(embedder):
    """Two different sentences by the same voice are more similar than the same sentences by any other voice."""
    prompts = {v: embedder.embed(speak(PROMPT_TEXT, v)) for v in SIM_VOICES}
    outputs = {v: embedder.embed(speak(SENTENCES[0], v)) for v in SIM_VOICES}
    for v in SIM_VOICES:
        same = cosine_similarity(outputs[v], prompts[v])
        others = {w: cosine_similarity(outputs[v], prompts[w]) for w in SIM_VOICES if w != v}
        assert all(same > s for s in others.values()), (v, same, others)
        assert same > 0.8


@pytest.fixture(scope="module")
def espeak_set(tmp_path_factory) -> Path:
    """list.txt scoring outputs/ (espeak speech) against their own sentence and against a different one."""
    root = tmp_path_factory.mktemp("espeak-set")
    lines = []
    for v, voice in enumerate(WER_VOICES):
        write_wav(root / "prompts" / f"v{v}.wav", speak(PROMPT_TEXT, voice))
        for i in range(3):
            audio = speak(SENTENCES[i], voice)
            write_wav(root / "outputs" / f"own-{v}-{i}.wav", audio)
            write_wav(root / "outputs" / f"other-{v}-{i}.wav", audio)
            lines.append(f"own-{v}-{i}|{PROMPT_TEXT}|prompts/v{v}.wav|{SENTENCES[i]}")
            lines.append(f"other-{v}-{i}|{PROMPT_TEXT}|prompts/v{v}.wav|{SENTENCES[(i + 3) % len(SENTENCES)]}")
    (root / "list.txt").write_text("# espeak speech scored against its own and a different text\n"
                                   + "\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.mark.slow   # speech recognition of a whole test set
@needs_espeak
def test_audio_dir_scoring_wer_own_text_far_below_other_text(espeak_set, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--list", str(espeak_set / "list.txt"), "--audio-dir", str(espeak_set / "outputs"),
                 "--out", str(out), *OFFLINE]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["utt"]: r for r in results["utterances"]}
    assert len(rows) == 12 and results["summary"]["failed"] == 0
    own = [r["wer"] for u, r in rows.items() if u.startswith("own")]
    other = [r["wer"] for u, r in rows.items() if u.startswith("other")]
    assert np.mean(own) < 0.5, own
    assert np.mean(other) > 0.85, other
    assert np.mean(other) - np.mean(own) > 0.4
    # The same speaker as the prompt: high SIM for every file; no engine, so no latency.
    assert min(r["sim"] for r in rows.values()) > 0.8
    assert all(r["ttft_ms"] is None and r["rtf"] is None for r in rows.values())
    s = results["summary"]
    assert s["model"] is None and s["audio_dir"] == str(espeak_set / "outputs")
    assert s["sim_model"].startswith("resemblyzer") and s["asr_model"].startswith("pocketsphinx")
    assert s["ttft_ms_p50"] is None and s["rtf_mean"] is None
    report = (out / "report.md").read_text()
    assert "resemblyzer" in report and "pocketsphinx" in report and "0.817" in report
    assert (out / "sim_hist.png").stat().st_size > 1000 and (out / "wer_per_utt.png").is_file()
    assert not (out / "ttft_cdf.png").exists()
    assert "SIM model: resemblyzer" in capsys.readouterr().out


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow   # eval end to end
def test_eval_end_to_end_on_random_model(tiny_random_dir, tmp_path):
    shutil.copy(SPEECH_WAV, tmp_path / "prompt.wav")
    (tmp_path / "corrupt.wav").write_bytes(b"this is not audio")
    listfile = write_list(tmp_path / "list.txt", [
        "# a comment line",
        "broken|Hello.|corrupt.wav|This prompt cannot be decoded.",  # first: the warm-up must not stop the run
        "u1|Hello there. Could you tell me what the weather will be like tomorrow?|prompt.wav|Good morning to you.",
        "u2|Hello there. Could you tell me what the weather will be like tomorrow?|prompt.wav|See you later.",
    ])
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_random_dir), "--list", str(listfile), "--out", str(out),
                 "--max-frames", "4", *OFFLINE]) == 0
    results = json.loads((out / "results.json").read_text())
    s, rows = results["summary"], {r["utt"]: r for r in results["utterances"]}
    assert list(rows) == ["broken", "u1", "u2"]
    assert s["utterances"] == 3 and s["failed"] == 1
    assert "error" in rows["broken"] and "corrupt.wav" not in s["sim_model"]
    for u in ("u1", "u2"):
        r = rows[u]
        assert "error" not in r
        assert -1 <= r["sim"] <= 1 and r["wer"] >= 0 and isinstance(r["transcript"], str)
        assert r["ttft_ms"] > 0 and r["rtf"] > 0 and r["frames"] == 4
        assert r["audio_seconds"] == pytest.approx(4 * 0.08)
        assert set(r["breakdown_ms"]) == {"reasoner", "backbone", "decoder", "codec"}
        assert (out / r["audio"]).is_file()
    assert s["ttft_ms_p50"] > 0 and s["ttft_ms_p90"] >= s["ttft_ms_p50"] and s["rtf_mean"] > 0
    assert s["sim_mean"] == pytest.approx(np.mean([rows["u1"]["sim"], rows["u2"]["sim"]]))
    assert s["model"] == str(tiny_random_dir)
    report = (out / "report.md").read_text()
    assert "TTFT p50" in report and "146.87" in report and "broken" in report and "meaningless" in report
    for png in ("sim_hist.png", "wer_per_utt.png", "ttft_cdf.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow   # eval end to end
def test_eval_dialogue_task_uses_the_answer_text(tiny_random_dir, tmp_path):
    shutil.copy(SPEECH_WAV, tmp_path / "prompt.wav")
    shutil.copy(SPEECH_WAV, tmp_path / "user.wav")
    listfile = write_list(tmp_path / "list.txt", ["d1|Hello there. Could you tell me what the weather will be "
                                                  "like tomorrow?|prompt.wav|user.wav"])
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_random_dir), "--task", "dialogue", "--list", str(listfile),
                 "--out", str(out), "--max-frames", "4", "--warmup", "0", *OFFLINE]) == 0
    (row,) = json.loads((out / "results.json").read_text())["utterances"]
    assert "error" not in row, row.get("error")
    assert row["reference_text"] == row["text"]  # the model's own answer is the WER reference
    assert row["ttft_ms"] > 0 and row["sim"] is not None


@pytest.mark.parametrize("lines, message", [
    (None, "test list not found"),
    (["u1|only three|fields"], "expected 4 fields"),
    (["u1|text|missing.wav|hello"], "missing.wav not found"),
    (["u1||prompt.wav|hello"], "empty prompt_text"),
    (["u1|text|prompt.wav|hello", "u1|text|prompt.wav|again"], "repeats line 1"),
])
def test_bad_lists_are_rejected_before_any_model_loads(tmp_path, capsys, lines, message):
    shutil.copy(SPEECH_WAV, tmp_path / "prompt.wav")
    listfile = tmp_path / "list.txt"
    if lines is not None:
        write_list(listfile, lines)
    # The model does not exist: had it been loaded first, the error would name it instead of the list.
    code = main(["eval", "--model", str(tmp_path / "no-such-model"), "--list", str(listfile),
                 "--out", str(tmp_path / "out"), *OFFLINE])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "no-such-model" not in err
    assert not (tmp_path / "out").exists()


def test_model_or_audio_dir_is_required(tmp_path, capsys):
    assert main(["eval", "--list", str(tmp_path / "list.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "--model" in capsys.readouterr().err


def test_audio_dir_with_no_matching_files_is_an_error(tmp_path, capsys):
    shutil.copy(SPEECH_WAV, tmp_path / "prompt.wav")
    listfile = write_list(tmp_path / "list.txt", ["u1|text|prompt.wav|hello"])
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--list", str(listfile), "--audio-dir", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out"), *OFFLINE]) == 1
    assert "u1.wav" in capsys.readouterr().err


@needs_espeak
def test_wavlm_speaker_model_code_path(tmp_path):
    """The default SIM backend (transformers WavLMForXVector) runs from a local directory; with random weights of
    a tiny configuration, since the real ones cannot be downloaded here."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    torch.manual_seed(0)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, tdnn_dim=(32, 32), tdnn_kernel=(3, 1),
                         tdnn_dilation=(1, 1), xvector_output_dim=16, num_buckets=32, max_bucket_distance=64)
    WavLMForXVector(config).save_pretrained(tmp_path / "wavlm")
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True).save_pretrained(tmp_path / "wavlm")
    model = load_speaker_model(str(tmp_path / "wavlm"))
    assert "wavlm" in model.name and str(tmp_path / "wavlm") in model.name
    a = model.embed(speak(SENTENCES[0], "en-us+f2"))
    assert a.shape == (16,) and np.isfinite(a).all()
    assert cosine_similarity(a, a) == pytest.approx(1.0)


@needs_espeak
def test_auto_models_fall_back_offline_and_the_report_names_them(tmp_path, monkeypatch, capsys):
    """With the hub unreachable (HF_HUB_OFFLINE) and no cached weights, auto uses the package-shipped models."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached
    write_wav(tmp_path / "prompt.wav", speak(PROMPT_TEXT, "en-us+f2"))
    write_wav(tmp_path / "outputs" / "u1.wav", speak(SENTENCES[2], "en-us+f2"))
    listfile = write_list(tmp_path / "list.txt", [f"u1|{PROMPT_TEXT}|prompt.wav|{SENTENCES[2]}"])
    assert main(["eval", "--list", str(listfile), "--audio-dir", str(tmp_path / "outputs"),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "SIM: microsoft/wavlm-base-plus-sv" in captured.err and "falling back to resemblyzer" in captured.err
    assert "ASR: openai/whisper-large-v3" in captured.err and "falling back to pocketsphinx" in captured.err
    s = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert s["sim_model"].startswith("resemblyzer") and s["asr_model"].startswith("pocketsphinx")
    assert s["sim_mean"] > 0.8


@pytest.mark.slow   # speech recognition
@needs_espeak
def test_dialogue_audio_dir_takes_the_answer_text_from_a_txt_file(tmp_path):
    shutil.copy(SPEECH_WAV, tmp_path / "prompt.wav")
    shutil.copy(SPEECH_WAV, tmp_path / "user.wav")
    write_wav(tmp_path / "answers" / "d1.wav", speak(SENTENCES[2], "en-us+f2"))
    (tmp_path / "answers" / "d1.txt").write_text(SENTENCES[2] + "\n")
    write_wav(tmp_path / "answers" / "d2.wav", speak(SENTENCES[2], "en-us+f2"))  # no d2.txt: no WER reference
    listfile = write_list(tmp_path / "list.txt", ["d1|Hello there.|prompt.wav|user.wav",
                                                  "d2|Hello there.|prompt.wav|user.wav"])
    out = tmp_path / "out"
    assert main(["eval", "--task", "dialogue", "--list", str(listfile), "--audio-dir", str(tmp_path / "answers"),
                 "--out", str(out), *OFFLINE]) == 0
    rows = {r["utt"]: r for r in json.loads((out / "results.json").read_text())["utterances"]}
    assert rows["d1"]["reference_text"] == SENTENCES[2] and rows["d1"]["wer"] < 0.5
    assert rows["d2"]["reference_text"] is None and rows["d2"]["wer"] is None and rows["d2"]["sim"] is not None


def test_stage_breakdown_reads_the_engines_timing_keys():
    from openchroma.eval.run import stage_breakdown

    assert stage_breakdown({"ttft_ms": 12.0, "rtf": 0.3}) == {"reasoner": None, "backbone": None, "decoder": None,
                                                              "codec": None}
    got = stage_breakdown({"reasoner_ms": 119.1, "backbone_first_frame_ms": 9.5, "decoder_ms": 4.0,
                           "mimi_decode_ms": 2.5, "ttft_ms": 140.0})
    assert got == {"reasoner": 119.1, "backbone": 9.5, "decoder": 4.0, "codec": 2.5}


def tiny_random_whisper(path: Path) -> Path:
    """A Whisper model of the real architecture with random weights, a byte-level vocabulary and the special tokens
    ``generate(language="en", task="transcribe")`` needs: it transcribes nonsense, through the real code path."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(bytes_to_unicode().values())}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    eot = "<|endoftext|>"
    tok = WhisperTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), unk_token=eot, bos_token=eot,
                           eos_token=eot, pad_token=eot)
    specials = ["<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tok.convert_tokens_to_ids(t) for t in [eot, *specials]}
    config = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_target_positions=64, pad_token_id=ids[eot], bos_token_id=ids[eot],
                           eos_token_id=ids[eot], decoder_start_token_id=ids["<|startoftranscript|>"])
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids[eot], pad_token_id=ids[eot],
        bos_token_id=ids[eot], max_length=12, is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"])
    model.save_pretrained(path)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tok).save_pretrained(path)
    return path


@pytest.mark.slow   # a Whisper model over espeak speech
@needs_espeak
def test_whisper_recognizer_code_path(tmp_path, capsys):
    """The default ASR backend (transformers Whisper) from a local directory, on a tiny random model since the
    real weights cannot be downloaded here; audio over 30 s is transcribed window by window."""
    from openchroma.eval.asr import load_recognizer

    whisper_dir = tiny_random_whisper(tmp_path / "whisper")
    recognizer = load_recognizer(str(whisper_dir))
    assert recognizer.name.startswith("whisper") and str(whisper_dir) in recognizer.name
    noise = np.random.default_rng(0).standard_normal(16000 * 35).astype(np.float32) * 0.1
    windows = [recognizer.transcribe(noise[s:s + 16000 * 30]) for s in (0, 16000 * 30)]
    assert recognizer.transcribe(noise) == " ".join(w for w in windows if w)

    write_wav(tmp_path / "prompt.wav", speak(PROMPT_TEXT, "en-us+f2"))
    write_wav(tmp_path / "outputs" / "u1.wav", speak(SENTENCES[0], "en-us+f2"))
    listfile = write_list(tmp_path / "list.txt", [f"u1|{PROMPT_TEXT}|prompt.wav|{SENTENCES[0]}"])
    assert main(["eval", "--list", str(listfile), "--audio-dir", str(tmp_path / "outputs"), "--out",
                 str(tmp_path / "out"), "--sim-model", "resemblyzer", "--asr-model", str(whisper_dir),
                 "--no-progress"]) == 0
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())["utterances"]
    assert "error" not in row and isinstance(row["transcript"], str) and row["wer"] is not None
    assert "ASR model: whisper" in capsys.readouterr().out

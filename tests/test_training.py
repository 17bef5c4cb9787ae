"""Issue 13: `openchroma prepare` and `openchroma train` through the CLI, on the tiny random checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tone, write_dataset

import openchroma
from openchroma.cli import main
from openchroma.training.data import PreparedDataset

ROOT = Path(__file__).resolve().parents[1]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def data2(tmp_path_factory, tiny_random_dir) -> tuple[Path, Path]:
    """Two examples: the manifest and its prepared directory."""
    root = tmp_path_factory.mktemp("data2")
    manifest = write_dataset(root, rows=2)
    prepared = root / "prepared"
    assert main(["prepare", "--model", str(tiny_random_dir), "--data", str(manifest), "--out", str(prepared)]) == 0
    return manifest, prepared


@pytest.fixture(scope="module")
def data4(tmp_path_factory, tiny_random_dir) -> Path:
    root = tmp_path_factory.mktemp("data4")
    manifest = write_dataset(root, rows=4, response_seconds=0.8)
    prepared = root / "prepared"
    assert main(["prepare", "--model", str(tiny_random_dir), "--data", str(manifest), "--out", str(prepared),
                 "--shard-size", "3"]) == 0
    return prepared


def _train(model: Path, data: Path, out: Path, *extra: str) -> None:
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress",
                 "--no-tensorboard", *extra]) == 0


def test_prepare_writes_shards(data2, tiny_random_dir):
    _, prepared = data2
    ds = PreparedDataset(prepared)
    assert len(ds) == 2
    t = ds.tensors(0)
    cfg = openchroma.load(tiny_random_dir, device="cpu", progress=False).config
    assert t["codes"].shape == (15, cfg.audio_num_codebooks)  # 1.2 s at 12.5 frames/s
    assert t["hidden"].shape == (t["text_ids"].numel(), cfg.reasoner.hidden_size)
    assert t["text_ids"][-1] == cfg.im_end_token_id
    assert ds.frames(0) == 16  # + the end-of-audio frame


@pytest.mark.slow   # a training run to overfit
def test_overfit_then_generation_reproduces_targets(data2, tiny_random_dir, tmp_path):
    """Full fine-tuning on 2 examples: loss falls by >= 90 %, and greedy forced-text generation with the
    fine-tuned checkpoint reproduces the training target's codes (and stops with end-of-audio)."""
    manifest, prepared = data2
    out = tmp_path / "full"
    _train(tiny_random_dir, prepared, out, "--steps", "150", "--lr", "1e-2", "--warmup", "10", "--batch-size", "2")
    m = _metrics(out)
    assert [r["step"] for r in m] == list(range(1, 151))
    assert {"loss", "loss_c0", "loss_c1_7"} <= set(m[0])
    assert m[-1]["loss"] <= 0.1 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])

    # The output is a complete checkpoint: the public loader and pipeline take it.
    chroma = openchroma.Chroma.from_pretrained(out, device="cpu", progress=False)
    ds = PreparedDataset(prepared)
    row = json.loads(manifest.read_text().splitlines()[0])
    voice = chroma.voice(manifest.parent / row["voice_audio"], row["voice_text"])
    messages = [{"role": "system", "content": [{"type": "text", "text": openchroma.pipeline.DEFAULT_SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "text", "text": row["user_text"]}]}]
    target = ds.tensors(0)
    result = openchroma.generate(chroma.model, chroma.prompt_ids(messages), voice,
                                 max_new_frames=target["codes"].shape[0] + 3,
                                 forced_text_tokens=target["text_ids"].tolist(), decode_audio=False)
    assert torch.equal(result.codes[:4], target["codes"][:4])
    assert result.stop_reason == "eos" and torch.equal(result.codes, target["codes"])

    # Only the backbone and decoder changed; the reasoner and codec are the base's, bit for bit.
    base, tuned = _weights(tiny_random_dir), _weights(out)
    assert base.keys() == tuned.keys()
    for k in base:
        if k.startswith(("thinker.", "codec_model.")):
            assert torch.equal(base[k], tuned[k]), k
    assert not torch.equal(base["backbone.codebook0_head.weight"], tuned["backbone.codebook0_head.weight"])


def test_lora_trains_only_adapters_and_merges(data2, tiny_random_dir, tmp_path):
    _, prepared = data2
    out = tmp_path / "lora"
    _train(tiny_random_dir, prepared, out, "--lora", "--lora-rank", "4", "--lora-alpha", "8", "--steps", "5",
           "--lr", "1e-2", "--batch-size", "2", "--save-adapter")
    ck = out / "checkpoints" / "step-0000005" / "trainable.safetensors"
    trained = load_file(str(ck))
    assert trained and all("lora_" in k for k in trained)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    base, merged = _weights(tiny_random_dir), _weights(out)
    scale = 8 / 4
    changed = 0
    for k in base:
        a_key = next((a for a in adapter if a.startswith(k.removesuffix(".weight") + ".lora_A")), None)
        if a_key is None:
            assert torch.equal(base[k], merged[k]), f"{k} changed without an adapter"
            continue
        b = adapter[a_key.replace("lora_A", "lora_B")]
        expected = base[k] + scale * b @ adapter[a_key]
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6)
        changed += 1
    # q,k,v,o,gate,up,down in every layer of the backbone and the decoder
    assert changed == 7 * 4
    openchroma.load(out, device="cpu", progress=False)


def test_sharded_base_gives_sharded_output(data2, tmp_path):
    """A base stored as several shards with an index (as the published 4B is) keeps that layout."""
    from openchroma.tools.init_random import write_random_checkpoint

    base = write_random_checkpoint("tiny", tmp_path / "sharded", seed=0, shard_bytes=1 << 20, progress=False)
    assert (base / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    _train(base, data2[1], out, "--lora", "--lora-rank", "2", "--steps", "2", "--batch-size", "2")
    assert (out / "model.safetensors.index.json").read_text() == (base / "model.safetensors.index.json").read_text()
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert (out / "tokenizer.json").is_file()
    openchroma.load(out, device="cpu", progress=False)


@pytest.mark.slow   # training runs
def test_train_from_a_manifest_and_only_the_chosen_part(data2, tiny_random_dir, tmp_path):
    """--data may be a manifest (prepared into OUT/prepared first); --train backbone leaves the decoder's own
    weights alone (the audio-code embedding table is shared: the backbone reads it too)."""
    manifest, _ = data2
    out = tmp_path / "bb"
    _train(tiny_random_dir, manifest, out, "--train", "backbone", "--steps", "2", "--batch-size", "2", "--lr", "1e-2")
    assert len(PreparedDataset(out / "prepared")) == 2
    base, tuned = _weights(tiny_random_dir), _weights(out)
    for k in base:
        if k.startswith("decoder.") and not k.startswith("decoder.audio_embedding."):
            assert torch.equal(base[k], tuned[k]), k
    assert not torch.equal(base["backbone.model.layers.0.mlp.up_proj.weight"],
                           tuned["backbone.model.layers.0.mlp.up_proj.weight"])
    assert main(["train", "--model", str(tiny_random_dir), "--data", str(manifest), "--out", str(tmp_path / "x"),
                 "--train", "vocoder"]) == 1


def test_reasoner_gets_no_gradient(data2, tiny_random_dir):
    from openchroma.training.sequence import eos_frame
    from openchroma.training.train import TrainConfig, Trainee, drop_reasoner, setup_trainable

    _, prepared = data2
    model = openchroma.load(tiny_random_dir, device="cpu", progress=False).model
    drop_reasoner(model)
    setup_trainable(model, TrainConfig(model="", data="", out=""))
    ds = PreparedDataset(prepared)
    exs = [ds.example(i, eos_frame(model)) for i in range(2)]
    a, b = Trainee(model)(exs, torch.arange(sum(ex.codes.shape[0] for ex in exs)))
    (a + b).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.thinker.parameters())
    assert model.backbone.codebook0_head.weight.grad is not None
    assert model.decoder.codebook_head.weight.grad is not None


@pytest.mark.slow   # training runs, twice
def test_resume_equals_uninterrupted(data4, tiny_random_dir, tmp_path):
    args = ["--steps", "6", "--lr", "3e-3", "--warmup", "2", "--batch-size", "2", "--lora", "--lora-rank", "4",
            "--decoder-fraction", "0.5", "--holdout", "1", "--eval-every", "2", "--gradient-checkpointing",
            "--save-every", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _train(tiny_random_dir, data4, whole, *args)
    _train(tiny_random_dir, data4, parts, *args, "--stop-after", "3")
    assert [r["step"] for r in _metrics(parts)] == [1, 2, 3]
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    evals = [r for r in _metrics(whole) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and evals[-1]["eval_loss"] > 0
    _train(tiny_random_dir, data4, parts, *args)
    timing = ("examples_per_s", "elapsed_s", "cpu_s")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _metrics(whole)]
    assert [{k: v for k, v in r.items() if k not in timing} for r in _metrics(parts)] == strip
    a, b = _weights(whole), _weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _torchrun(model: Path, data: Path, out: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "openchroma", "train", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _same_run(one: Path, two: Path) -> None:
    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2) == 4
    for r1, r2 in zip(m1, m2, strict=True):
        for k in ("loss", "loss_c0", "loss_c1_7"):
            assert abs(r1[k] - r2[k]) <= 1e-5, (r1["step"], k, r1[k], r2[k])
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def one_process_run(data4, tiny_random_dir, tmp_path_factory) -> Path:
    one = tmp_path_factory.mktemp("one")
    _train(tiny_random_dir, data4, one, *DIST_ARGS)
    return one


DIST_ARGS = ["--steps", "4", "--lr", "3e-3", "--batch-size", "4", "--no-progress", "--no-tensorboard"]


@pytest.mark.slow   # torchrun
def test_ddp_two_gloo_processes_equal_one(one_process_run, data4, tiny_random_dir, tmp_path):
    """Same global batch of 4: one process at once vs 2 processes x 2 accumulated micro-batches of 1."""
    two = tmp_path / "two"
    _torchrun(tiny_random_dir, data4, two, *DIST_ARGS, "--grad-accum", "2")
    m1, m2 = _metrics(one_process_run), _metrics(two)
    assert len(m1) == len(m2) == 4
    for r1, r2 in zip(m1, m2, strict=True):
        for k in ("loss", "loss_c0", "loss_c1_7"):
            assert abs(r1[k] - r2[k]) <= 1e-5, (r1["step"], k, r1[k], r2[k])
    # The two runs add the batch's float32 gradient terms in different orders (one batch of 4, or 2 processes x
    # 2 micro-batches of 1, then an all-reduce), so each gradient element differs by rounding: a few ulps of the
    # sum of its terms' magnitudes. AdamW divides each element's step by the root of its own squared-gradient
    # average, so an element whose gradient is itself near that rounding level steps by a fraction of the
    # learning rate that rounding can change noticeably (here 1 element in 2048 of one matrix by 1.2e-5, on some
    # CPUs), whatever the gradient's scale. So the test asks (1) the bulk to agree at float32 precision: all but
    # 1 in 10,000 elements within 1e-6; (2) every element within 1 % of the furthest AdamW can move any element
    # in the run, about one learning rate per step (the sum of the logged rates: 7.5e-3). Runs that really
    # differ (a micro-batch lost, gradients not all-reduced) move most elements by a good part of that.
    a, b = _weights(one_process_run), _weights(two)
    assert a.keys() == b.keys()
    reach = sum(r["lr"] for r in m1)
    total = sum(t.numel() for t in a.values())
    off = sum(int(((a[k].double() - b[k].double()).abs() > 1e-6).sum()) for k in a)
    assert off <= total // 10_000, f"{off} of {total} weights differ by more than 1e-6"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0.01 * reach, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow   # torchrun
def test_fsdp_two_gloo_processes_equal_one_and_resume(one_process_run, data4, tiny_random_dir, tmp_path):
    """FSDP2 (full fine-tuning sharded over 2 gloo processes), interrupted after step 2 and resumed."""
    two = tmp_path / "fsdp"
    _torchrun(tiny_random_dir, data4, two, *DIST_ARGS, "--fsdp", "--stop-after", "2")
    assert [r["step"] for r in _metrics(two)] == [1, 2]
    _torchrun(tiny_random_dir, data4, two, *DIST_ARGS, "--fsdp")
    _same_run(one_process_run, two)


# ----- bad rows ----------------------------------------------------------------------------------------------

def _bad_rows(root: Path) -> list[tuple[dict | str, str]]:
    import soundfile as sf

    (root / "audio" / "garbage.wav").write_bytes(b"this is not audio")
    sf.write(root / "audio" / "long.wav", tone(3.0, 200.0), 24000)
    good = {"voice_audio": "audio/voice.wav", "voice_text": "hello there", "user_text": "q?",
            "response_text": "answer 0", "response_audio": "audio/resp0.wav"}
    return [
        ({**good, "response_audio": "audio/missing.wav"}, "not found"),
        ({**good, "voice_audio": "audio/garbage.wav"}, "voice_audio"),
        ({**good, "response_text": "  "}, "'response_text' is empty"),
        ({**good, "voice_text": ""}, "'voice_text' is empty"),
        ({k: v for k, v in good.items() if k != "user_text"}, "no question"),
        ({**good, "response_audio": "audio/long.wav"}, "more than the limit"),
        ({**good, "response_text": "a much longer answer than this short audio can ever carry at one token "
                                   "for every two frames of speech, really"}, "too short for the text"),
        ("{not json", "not valid JSON"),
        ({k: v for k, v in good.items() if k != "response_audio"}, "missing 'response_audio'"),
    ]


@pytest.mark.slow   # prepare over every kind of bad row
def test_every_bad_row_is_named(tmp_path, tiny_random_dir, capsys):
    import soundfile as sf

    manifest = write_dataset(tmp_path, rows=1)
    good_line = manifest.read_text()
    cases = _bad_rows(tmp_path)
    for i, (row, expected) in enumerate(cases):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(good_line + (row if isinstance(row, str) else json.dumps(row)) + "\n")
        code = main(["prepare", "--model", str(tiny_random_dir), "--data", str(bad), "--out", str(tmp_path / f"p{i}"),
                     "--max-response-seconds", "2"])
        err = capsys.readouterr().err
        assert code == 1
        assert f"{bad}:2:" in err and expected in err, (expected, err)
    # Longer than the backbone's context (voice prompt + 2 positions per frame > max_position_embeddings).
    sf.write(tmp_path / "audio" / "huge.wav", tone(85.0, 200.0, rate=8000), 8000)
    huge = tmp_path / "huge.jsonl"
    row = json.loads(good_line)
    huge.write_text(good_line + json.dumps({**row, "response_audio": "audio/huge.wav"}) + "\n")
    assert main(["prepare", "--model", str(tiny_random_dir), "--data", str(huge), "--out", str(tmp_path / "ph"),
                 "--max-response-seconds", "120"]) == 1
    err = capsys.readouterr().err
    assert f"{huge}:2:" in err and "more than the context of 2048" in err, err
    every = tmp_path / "every.jsonl"
    every.write_text(good_line + "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r, _ in cases))
    assert main(["prepare", "--model", str(tiny_random_dir), "--data", str(every), "--out", str(tmp_path / "skip"),
                 "--max-response-seconds", "2", "--skip-bad"]) == 0
    captured = capsys.readouterr().out
    assert f"skipped {len(cases)} bad row(s)" in captured
    assert json.loads(captured.strip().splitlines()[-1]) == {"out": str(tmp_path / "skip"), "examples": 1,
                                                              "skipped": len(cases)}
    assert len(PreparedDataset(tmp_path / "skip")) == 1


@pytest.mark.slow   # prepare, twice
def test_prepare_resumes_after_interruption(tmp_path, tiny_random_dir):
    manifest = write_dataset(tmp_path, rows=3, response_seconds=0.8)
    out = tmp_path / "prepared"
    args = ["prepare", "--model", str(tiny_random_dir), "--data", str(manifest), "--out", str(out), "--shard-size", "1"]
    assert main(args) == 0
    whole = PreparedDataset(out)
    reference = [whole.tensors(i) for i in range(3)]
    # Interrupted before the last shard was written and the index was closed:
    meta = json.loads((out / "prepared.json").read_text())
    (out / "shard-00002.safetensors").unlink()
    meta["complete"] = False
    (out / "prepared.json").write_text(json.dumps(meta))
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.raises(ValueError, match="did not finish"):
        PreparedDataset(out)
    assert main(args) == 0
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept
    again = PreparedDataset(out)
    assert len(again) == 3
    for i in range(3):
        assert all(torch.equal(again.tensors(i)[k], reference[i][k]) for k in reference[i])

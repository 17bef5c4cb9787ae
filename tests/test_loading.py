"""Loading: local directories, sharded checkpoints, hub ids (from the local cache), dtypes, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from openchroma.loading import CheckpointError, load

KEY = "backbone.model.layers.0.self_attn.q_proj.weight"


def _write(dir_: Path, tensors: dict, config: dict | None, fixture_dir: Path) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dir_ / "model.safetensors"))
    cfg = config if config is not None else json.loads((fixture_dir / "config.json").read_text())
    (dir_ / "config.json").write_text(json.dumps(cfg))
    return dir_


@pytest.fixture(scope="module")
def tensors(fixture_dir):
    return load_file(str(fixture_dir / "model.safetensors"))


def test_loads_fixture_and_skips_the_vision_tower(tiny_model, fixture_dir):
    names = set(load_file(str(fixture_dir / "model.safetensors")))
    assert any(k.startswith("thinker.visual.") for k in names)
    sd = tiny_model.model.state_dict()
    assert not any(k.startswith("thinker.visual.") for k in sd)
    # Ties: the reasoner's lm_head is its embedding; the backbone uses the decoder's audio embedding.
    assert tiny_model.model.thinker.lm_head.weight is tiny_model.model.thinker.model.embed_tokens.weight
    assert tiny_model.num_parameters > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_in_half_precision(fixture_dir, dtype):
    lm = load(fixture_dir, device="cpu", dtype=dtype, progress=False)
    assert lm.model.backbone.model.norm.weight.dtype == dtype
    ref = load_file(str(fixture_dir / "model.safetensors"))[KEY]
    torch.testing.assert_close(lm.model.backbone.model.layers[0].self_attn.q_proj.weight.float(),
                               ref.to(dtype).float())


def test_loading_leaves_process_state_alone_and_materialises_everything(fixture_dir, tiny_model):
    """Built on the meta device and assigned: no process-wide default dtype or init patching (the server loads on
    a background thread), every tensor real, derived buffers (rotary tables, codec tables) float32 as before."""
    init_fns = {n: getattr(torch.nn.init, n) for n in ("normal_", "uniform_", "kaiming_uniform_", "zeros_")}
    lm = load(fixture_dir, device="cpu", dtype=torch.bfloat16, progress=False)
    assert torch.get_default_dtype() == torch.float32
    assert all(getattr(torch.nn.init, n) is f for n, f in init_fns.items())
    tensors = {**dict(lm.model.named_parameters()), **dict(lm.model.named_buffers())}
    assert not [n for n, t in tensors.items() if t.is_meta]
    assert lm.model.thinker.model.rotary.cos.dtype == torch.float32
    assert lm.model.codec_model.decoder_transformer.inv_freq.dtype == torch.float32
    for name, t in tiny_model.model.named_buffers():  # derived buffers equal a float32 load's
        if not t.is_floating_point():
            assert torch.equal(t, tensors[name]), name
        elif name.endswith(("rotary.cos", "rotary.sin", "inv_freq", "positions")):
            assert torch.equal(t, tensors[name]), name


def test_sharded_checkpoint_through_index(fixture_dir, tensors, tmp_path):
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / f))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(fixture_dir / "config.json", tmp_path / "config.json")
    lm = load(tmp_path, device="cpu", progress=False)
    torch.testing.assert_close(lm.model.backbone.model.layers[0].self_attn.q_proj.weight, tensors[KEY])


def test_missing_shard_names_the_file(fixture_dir, tensors, tmp_path):
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(fixture_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: listed in .* but missing"):
        load(tmp_path, device="cpu", progress=False)


def test_hub_repo_id_resolves_from_the_local_cache(fixture_dir, tmp_path, monkeypatch):
    # Build the hub cache layout huggingface_hub uses, then load by repo id fully offline.
    repo = tmp_path / "hub" / "models--FlashLabs--Chroma-Tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(fixture_dir / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    lm = load("FlashLabs/Chroma-Tiny", device="cpu", progress=False)
    assert lm.path == snap


def test_unknown_repo_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="nobody/nothing: could not download"):
        load("nobody/nothing", device="cpu", progress=False)


def test_absent_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load(tmp_path / "missing" / "dir", device="cpu", progress=False)


def test_directory_without_weights(fixture_dir, tmp_path):
    shutil.copy(fixture_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(tmp_path, device="cpu", progress=False)


def test_missing_key_names_key(fixture_dir, tensors, tmp_path):
    t = dict(tensors)
    del t[KEY]
    with pytest.raises(CheckpointError, match=f"{KEY}' is missing"):
        load(_write(tmp_path, t, None, fixture_dir), device="cpu", progress=False)


def test_unexpected_key_names_file_and_key(fixture_dir, tensors, tmp_path):
    t = dict(tensors)
    t["backbone.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'backbone.extra.weight'"):
        load(_write(tmp_path, t, None, fixture_dir), device="cpu", progress=False)


def test_wrong_shape_names_key_and_shapes(fixture_dir, tensors, tmp_path):
    t = dict(tensors)
    t[KEY] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=rf"'{KEY}' has shape \[3, 3\], the config implies \[32, 32\]"):
        load(_write(tmp_path, t, None, fixture_dir), device="cpu", progress=False)


def test_truncated_file(fixture_dir, tmp_path):
    shutil.copy(fixture_dir / "config.json", tmp_path / "config.json")
    data = (fixture_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path, device="cpu", progress=False)


def test_config_that_is_not_chroma(fixture_dir, tensors, tmp_path):
    with pytest.raises(CheckpointError, match="not a Chroma config .*model_type='llama'"):
        load(_write(tmp_path, tensors, {"model_type": "llama"}, fixture_dir), device="cpu", progress=False)


def test_config_not_json(fixture_dir, tmp_path):
    shutil.copy(fixture_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load(tmp_path, device="cpu", progress=False)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        load("whatever", dtype="int3")

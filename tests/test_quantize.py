"""Weight-only quantization: the layers' arithmetic, pre-quantized checkpoints, the compiled step, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from openchroma import quantization
from openchroma.config import ChromaConfig
from openchroma.engine import Engine
from openchroma.loading import CheckpointError, build_model, load
from openchroma.models.quantized import QuantLinear, unpack_int4
from openchroma.tools import quantize as quantize_tool
from openchroma.tools.conformance import load_case
from openchroma.tools.fidelity import forced_logits

CPU = torch.device("cpu")


def _dequantized(c: dict[str, torch.Tensor], scheme: str) -> torch.Tensor:
    if scheme == "int8":
        return c["qweight"].float() * c["scales"][:, None]
    codes = unpack_int4(c["qweight"]).float()
    n, groups = c["scales"].shape
    g = codes.shape[1] // groups
    return ((codes.view(n, groups, g) - 8) * c["scales"][..., None] + c["zeros"][..., None]).view(n, -1)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_linear_computes_its_dequantized_weight(scheme):
    """The packed kernels (rows padded for int4, bias added) give x @ W^T of the weight they stand for."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(100, 256, generator=gen), torch.randn(100, generator=gen)
    x = torch.randn(3, 5, 256, generator=gen)
    c = quantization.quantize_weight(w, scheme)
    layer = QuantLinear({**c, "bias": b}, scheme, 256, 100, CPU, torch.float32)
    want = x @ _dequantized(c, scheme).t() + b
    got = layer(x)
    assert got.shape == (3, 5, 100) and got.dtype == torch.float32
    # The kernels take bfloat16 activations: a relative error of bfloat16's order.
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert ((_dequantized(c, scheme) - w).norm() / w.norm()).item() < (0.01 if scheme == "int8" else 0.12)


def _quantize_cli(model, scheme: str, out) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    quantize_tool.add_arguments(parser)
    return quantize_tool.run(parser.parse_args(["--model", str(model), "--quantize", scheme, "--out", str(out),
                                                "--quiet"]))


@pytest.fixture(scope="module")
def forced_case(fixture_dir):
    from openchroma.voice import VoicePrompt

    case = load_case(fixture_dir / "case_speech_turn.safetensors")
    return case, VoicePrompt(case["prompt_text_ids"].reshape(-1), case["prompt_codes"])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_prequantized_checkpoint_loads_like_quantizing_at_load(fixture_dir, tmp_path, forced_case, scheme):
    """`openchroma quantize` writes a checkpoint that loads quantized without --quantize, to the same model."""
    assert _quantize_cli(fixture_dir, scheme, tmp_path) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == {"format": quantization.FORMAT, "scheme": scheme}
    assert (tmp_path / "model.safetensors").stat().st_size < 0.5 * (fixture_dir / "model.safetensors").stat().st_size
    saved = load(tmp_path, device="cpu", progress=False)
    at_load = load(fixture_dir, device="cpu", quantize=scheme, progress=False)
    assert saved.quantize == at_load.quantize == scheme
    a, b = forced_logits(saved, *forced_case), forced_logits(at_load, *forced_case)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(CheckpointError, match=f"quantized to {scheme}; it cannot load as"):
        load(tmp_path, device="cpu", quantize="int8" if scheme == "int4" else "int4", progress=False)


def test_fp8_needs_a_recent_cuda_gpu(fixture_dir):
    with pytest.raises(quantization.QuantizationError, match="fp8 weights need a CUDA GPU"):
        load(fixture_dir, device="cpu", quantize="fp8", progress=False)


def test_layers_too_narrow_for_int4_stay_unquantized_and_are_listed(fixture_dir):
    raw = json.loads((fixture_dir / "config.json").read_text())
    raw["thinker_config"]["audio_config"]["d_model"] = 48   # not a multiple of 32
    model = build_model(ChromaConfig.from_dict(raw))
    int4 = quantization.plan(model, "int4")
    assert "thinker.audio_tower.layers.0.fc1 (input width 48 is not a multiple of 32)" in int4.skipped
    assert "thinker.audio_tower.layers.0.fc1" not in int4.layers
    assert "thinker.audio_tower.layers.0.fc2" in int4.layers       # its input is the FFN width, 64
    assert not quantization.plan(model, "int8").skipped


def test_weight_report_counts_quantized_layers(fixture_dir):
    full = quantization.weight_report(load(fixture_dir, device="cpu", progress=False).model)
    small = quantization.weight_report(load(fixture_dir, device="cpu", quantize="int4", progress=False).model)
    assert {k: v["parameters"] for k, v in full.items()} == {k: v["parameters"] for k, v in small.items()}
    assert small["reasoner"]["weight_bytes"] < 0.3 * full["reasoner"]["weight_bytes"]
    assert small["codec"] == full["codec"]   # the Codec stays in the load dtype


@pytest.mark.slow   # an engine traced for every variant, sessions joining and leaving
def test_compiled_quantized_step_has_no_graph_breaks_or_recompiles(tiny_random_dir):
    """int4 layers (packed kernels) trace into one graph per variant; sessions joining and leaving reuse them."""
    from torch._dynamo.utils import counters

    from openchroma.pipeline import Chroma
    from openchroma.tokenizer import ChatTokenizer

    chroma = Chroma(load(tiny_random_dir, device="cpu", quantize="int4", progress=False),
                    ChatTokenizer.from_dir(tiny_random_dir))
    voice = np.random.default_rng(2).standard_normal(24000).astype(np.float32) * 0.1
    counters.clear()
    with Engine(chroma, max_sessions=2, max_context=256, max_response_frames=20, compile="eager") as eng:
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == len(eng.stepper.variants())
        eng.register_voice("v", voice, "hello", sample_rate=24000)
        for n in (1, 2, 1):
            sessions = [eng.create_session("v") for _ in range(n)]
            for s in sessions:
                s.add_text("Hi there.")
            for r in [s.respond(max_frames=12) for s in sessions]:
                assert r.result().frames > 0
            for s in sessions:
                s.close()
        assert counters["stats"]["unique_graphs"] == graphs
        assert not counters["graph_break"]


@pytest.mark.slow   # compile
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_inductor_compiles_quantized_layers_as_the_stepper_does(scheme):
    """Inductor (fullgraph, the stepper's CPU options) compiles the packed kernels and computes eager's output."""
    torch._dynamo.reset()   # guards are skipped, as in the stepper: no graph from another parameter is reused
    gen = torch.Generator().manual_seed(1)
    c = quantization.quantize_weight(torch.randn(64, 128, generator=gen), scheme)
    layer = QuantLinear(c, scheme, 128, 64, CPU, torch.float32)
    x = torch.randn(2, 1, 128, generator=gen)
    options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe, "cpp_wrapper": True}
    fn = torch.compile(lambda t: torch.nn.functional.silu(layer(t)), fullgraph=True, dynamic=False, options=options)
    with torch.inference_mode():
        torch.testing.assert_close(fn(x), torch.nn.functional.silu(layer(x)), rtol=1e-2, atol=1e-2)


PEAK_RSS = textwrap.dedent("""
    import resource, sys, json
    from openchroma.config import ChromaConfig
    from openchroma.loading import build_model, load
    build_model(ChromaConfig.from_file(sys.argv[1] + "/config.json"))   # the process's one-time costs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load(sys.argv[1], device="cpu", quantize=sys.argv[2] or None, progress=False)
    print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    from openchroma.tools.init_random import write_random_checkpoint

    return write_random_checkpoint("small", tmp_path_factory.mktemp("small"), seed=0, progress=False)


@pytest.mark.slow   # writes a 230 MB checkpoint and loads it twice in fresh interpreters
def test_int4_load_takes_at_most_half_the_memory_of_float32(small_dir):
    """Peak resident memory of loading (over what the process held before) in int4, against float32: layer by
    layer, blocks of rows at a time, the float weights are never all in memory."""
    def peak(q: str) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(small_dir), q], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return r["peak"] - r["before"]

    f32, int4 = peak(""), peak("int4")
    assert int4 <= 0.5 * f32, (int4, f32)

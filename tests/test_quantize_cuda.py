"""Quantized layers and the step on CUDA (skipped without a GPU; `.ci/gpu` runs them), and the step's fallback
when CUDA-graph capture fails."""

from __future__ import annotations

import pytest
import torch

from openchroma import quantization
from openchroma.loading import load
from openchroma.models.quantized import QuantLinear


def cuda(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


def test_failed_cuda_graph_capture_falls_back_to_running_without_graphs(fixture_dir):
    """A capture that fails (here: no CUDA at all) leaves a working step and says why, instead of an error."""
    from openchroma.tools.conformance import case_runner, run_case

    lm = load(fixture_dir, device="cpu", progress=False)
    case = fixture_dir / "case_text_turn.safetensors"
    runner = case_runner(lm, [case])
    runner.stepper.cuda_graphs = True   # as on a GPU whose capture fails
    runner.stepper.warmup(keys=[("think", 1)])
    assert runner.stepper.mode == "eager" and runner.stepper.graph_error
    assert run_case(lm, case, runner).passed


@cuda
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_linear_on_cuda_matches_cpu_dequantized(scheme):
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(200, 256, generator=gen), torch.randn(4, 256, generator=gen)
    c = quantization.quantize_weight(w, scheme)
    layer = QuantLinear(c, scheme, 256, 200, dev, torch.bfloat16)
    got = layer(x.to(dev, torch.bfloat16)).float().cpu()
    want = x @ w.t()
    assert ((got - want).norm() / want.norm()).item() < (0.03 if scheme == "int8" else 0.15)


@cuda
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_model_runs_a_case_on_cuda_with_graphs(fixture_dir, scheme):
    from openchroma.tools.conformance import case_runner, run_case

    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    lm = load(fixture_dir, device="cuda", dtype="bfloat16", quantize=scheme, progress=False)
    case = fixture_dir / "case_text_turn.safetensors"
    runner = case_runner(lm, [case], compile=True)
    runner.stepper.warmup(keys=[k for k in runner.stepper.variants() if k[0] == "think" or k[3]])
    assert runner.stepper.mode == "cuda-graphs", runner.stepper.graph_error
    report = run_case(lm, case, runner)
    assert report.n_frames > 0

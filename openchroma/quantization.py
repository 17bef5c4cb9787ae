"""Weight-only quantization of a Chroma model: which layers, how their weights are quantized, and how a loader
assembles the quantized layers one at a time (so the float weights are never all in memory).

Schemes (``--quantize``):

* ``int8``: every linear layer of the Reasoner's text model and audio encoder, the Backbone and the Decoder in
  int8 with one scale per output channel; output heads int8 too;
* ``int4``: the same layers in int4, asymmetric, in groups of 128 inputs (64 or 32 where the width is not a
  multiple of 128); output heads stay int8, where a logit's error matters most;
* ``fp8`` (CUDA, compute capability 8.9+): float8 e4m3 weights with one scale per output channel.

In every scheme the embedding tables (the Reasoner's tokens, the codebooks') are int8 with one scale per row and,
when the Reasoner's output head is tied to its table, the head reads the same int8 tensor. Convolutions, norms
and the Codec stay in the load dtype. A layer whose input width is not a multiple of 32 stays unquantized and
:func:`plan` lists it.

A pre-quantized checkpoint stores, for each quantized layer ``name``, ``name.qweight`` and ``name.scales``
(int4: and ``name.zeros``; the codes two a byte, the even column in the high nibble), in float32 for the scales;
its ``config.json`` records ``{"quantization": {"scheme": ..., "format": FORMAT}}``.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .constants import QUANTIZE_SCHEMES
from .models.quantized import QuantCodebookHeads, QuantEmbedding, QuantLinear

SCHEMES = QUANTIZE_SCHEMES
FORMAT = "openchroma-weight-only-v1"
INT4_GROUP_SIZES = (128, 64, 32)
FP8_MAX = 448.0  # float8 e4m3's largest finite value


class QuantizationError(ValueError):
    """A scheme this device or checkpoint cannot use."""


def check_device(scheme: str, device: torch.device) -> None:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if scheme == "fp8":
        if device.type != "cuda":
            raise QuantizationError("fp8 weights need a CUDA GPU of compute capability 8.9 or higher "
                                    "(on a CPU use int8 or int4)")
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise QuantizationError(f"fp8 weights need compute capability 8.9 or higher; this GPU has "
                                    f"{torch.cuda.get_device_capability(device)} (use int8 or int4)")


# ----- quantizing one weight ---------------------------------------------------------------------------------
def int4_group_size(in_features: int) -> int | None:
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """A float weight ``[N, K]`` -> its canonical quantized tensors (on ``w``'s device)."""
    w = w.float().contiguous()
    if scheme == "int8":
        scales = w.abs().amax(1).clamp(min=1e-12) / 127
        return {"qweight": torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), "scales": scales}
    if scheme == "fp8":
        scales = w.abs().amax(1).clamp(min=1e-12) / FP8_MAX
        return {"qweight": (w / scales[:, None]).to(torch.float8_e4m3fn), "scales": scales}
    if scheme != "int4":
        raise QuantizationError(f"unknown quantization scheme {scheme!r}")
    n, k = w.shape
    g = int4_group_size(k)
    if g is None:
        raise QuantizationError(f"int4 needs an input width that is a multiple of 32, got {k}")
    wg = w.reshape(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    codes = torch.round((wg - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    # The kernels compute (q - 8) * scale + zero, so the group's minimum sits at q = 0.
    return {"qweight": codes[:, 0::2] << 4 | codes[:, 1::2], "scales": scales, "zeros": lo + 8 * scales}


Reader = Callable[[int | None, int | None], torch.Tensor]
CHUNK_ELEMENTS = 1 << 20   # 4 MB of float32: what quantizing holds in float beside the result


def quantize_rows(read: Reader, rows: int, scheme: str, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Quantize a weight ``[rows, K]`` read a block of rows at a time (every scheme quantizes rows independently),
    so the float weight is never whole in memory: the Reasoner's token table alone is 311 M parameters."""
    step = max(1, CHUNK_ELEMENTS // max(1, read(0, 1).numel()))
    out: dict[str, torch.Tensor] = {}
    for a in range(0, rows, step):
        piece = quantize_weight(read(a, min(rows, a + step)).to(device), scheme)
        if not out:  # written in place, block by block: no list of pieces and no concatenated copy
            out = {k: torch.empty((rows, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in piece.items()}
        for k, v in piece.items():
            out[k][a:a + len(v)] = v
    return out


def canonical_shapes(spec: LayerSpec) -> dict[str, list[int]]:
    """The tensors (and shapes) a pre-quantized checkpoint holds for one quantized weight ``[N, K]``."""
    n, k = spec.rows, spec.cols
    if spec.scheme == "int4":
        groups = k // int4_group_size(k)
        return {"qweight": [n, k // 2], "scales": [n, groups], "zeros": [n, groups]}
    return {"qweight": [n, k], "scales": [n]}


# ----- which layers --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One weight to quantize: ``kind`` linear, embedding or heads (the Decoder's ``[n, H, V]`` parameter)."""

    name: str
    kind: str
    scheme: str
    rows: int          # N (output features; embedding rows; heads: V)
    cols: int          # K (input features; embedding width; heads: H)
    bias: bool = False
    count: int = 1     # heads: how many ``[V, H]`` matrices

    def keys(self) -> list[str]:
        """The float tensors a plain checkpoint holds for this layer."""
        return [f"{self.name}.weight"] + ([f"{self.name}.bias"] if self.bias else [])

    def quantized_keys(self) -> dict[str, list[int]]:
        """The tensors a pre-quantized checkpoint holds for this layer, with their shapes."""
        if self.kind == "heads":
            return {f"{self.name}.{i}.{t}": s for i in range(self.count) for t, s in canonical_shapes(self).items()}
        out = {f"{self.name}.{t}": s for t, s in canonical_shapes(self).items()}
        if self.bias:
            out[f"{self.name}.bias"] = [self.rows]
        return out


@dataclass
class Plan:
    scheme: str
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    tied_head: str | None = None     # a head that reads the quantized token table (not stored)
    skipped: list[str] = field(default_factory=list)


QUANTIZED_PARTS = ("thinker.model.", "thinker.audio_tower.", "backbone.", "decoder.")
HEADS = ("thinker.lm_head", "backbone.codebook0_head")
EMBEDDINGS = ("thinker.model.embed_tokens", "decoder.audio_embedding.embed_audio_tokens")


def plan(model: nn.Module, scheme: str) -> Plan:
    """Every weight of ``model`` (built on any device, ``meta`` included) that ``scheme`` quantizes."""
    out = Plan(scheme)
    head_scheme = "int8" if scheme == "int4" else scheme
    tied = bool(model.cfg.tie_word_embeddings)
    for name, mod in model.named_modules():
        if name in EMBEDDINGS:
            out.layers[name] = LayerSpec(name, "embedding", "int8", *mod.weight.shape)
        elif name == "decoder.codebook_head":
            n, h, v = mod.weight.shape
            out.layers[name] = LayerSpec(name, "heads", head_scheme, v, h, count=n)
        elif isinstance(mod, nn.Linear) and (name in HEADS or name.startswith(QUANTIZED_PARTS)):
            if name == "thinker.lm_head" and tied:
                out.tied_head = name
                continue
            s = head_scheme if name in HEADS else scheme
            if s == "int4" and int4_group_size(mod.in_features) is None:
                out.skipped.append(f"{name} (input width {mod.in_features} is not a multiple of 32)")
                continue
            out.layers[name] = LayerSpec(name, "linear", s, mod.out_features, mod.in_features, mod.bias is not None)
    return out


def saved_scheme(raw_config: dict) -> str | None:
    """The scheme a pre-quantized checkpoint's ``config.json`` records (None for a plain checkpoint)."""
    q = raw_config.get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("format") != FORMAT or q.get("scheme") not in SCHEMES:
        raise QuantizationError(f"config.json: quantization {q!r} is not one this version reads "
                                f"(format {FORMAT!r}, scheme one of {', '.join(SCHEMES)})")
    return q["scheme"]


# ----- assembling quantized layers while a checkpoint streams in ------------------------------------------------
class Assembler:
    """Collects each quantized layer's tensors as the loader reads them and builds the layer as soon as they are
    all there, on ``device``: float tensors (``prequantized`` False) are quantized first, then dropped."""

    def __init__(self, qplan: Plan, prequantized: bool, device: torch.device, dtype: torch.dtype):
        self.plan, self.prequantized, self.device, self.dtype = qplan, prequantized, device, dtype
        self.owner: dict[str, tuple[LayerSpec, str]] = {}
        for spec in qplan.layers.values():
            keys = spec.quantized_keys() if prequantized else dict.fromkeys(spec.keys())
            for k in keys:
                self.owner[k] = (spec, k[len(spec.name) + 1:])
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self.modules: dict[str, nn.Module] = {}

    def expected_shapes(self) -> dict[str, list[int]]:
        """Pre-quantized tensors and their shapes (for the loader's checks)."""
        return {k: v for spec in self.plan.layers.values() for k, v in spec.quantized_keys().items()}

    def add(self, key: str, read: Reader, rows: int) -> None:
        """Take tensor ``key`` (``rows`` rows), read through ``read(start, stop)`` (rows; None, None: whole)."""
        spec, part = self.owner[key]
        if not self.prequantized and part == "weight" and spec.kind != "heads":
            value: object = quantize_rows(read, rows, spec.scheme, self.device)  # never whole in float
        else:
            value = read(None, None).to(self.device)
        got = self._pending.setdefault(spec.name, {})
        got[part] = value
        if len(got) == sum(1 for s, _ in self.owner.values() if s is spec):
            self.modules[spec.name] = self._build(spec, self._pending.pop(spec.name))

    def _build(self, spec: LayerSpec, parts: dict) -> nn.Module:
        dev, dt = self.device, self.dtype
        if not self.prequantized:
            if spec.kind == "heads":
                parts = to_canonical(spec, parts)
            else:
                parts = {**parts["weight"], **({"bias": parts["bias"].float()} if "bias" in parts else {})}
        if spec.kind == "embedding":
            return QuantEmbedding(parts, dev, dt)
        if spec.kind == "heads":
            heads = []
            for i in range(spec.count):
                sub = {k.split(".", 1)[1]: v for k, v in parts.items() if k.startswith(f"{i}.")}
                heads.append(QuantLinear(sub, spec.scheme, spec.cols, spec.rows, dev, dt))
            return QuantCodebookHeads(heads)
        return QuantLinear(parts, spec.scheme, spec.cols, spec.rows, dev, dt)

    def install(self, model: nn.Module) -> None:
        """Put every built layer into ``model`` (and the tied head onto the int8 token table)."""
        missing = [n for n in self.plan.layers if n not in self.modules]
        if missing:
            raise RuntimeError(f"quantized layers not assembled: {', '.join(missing)}")
        for name, mod in self.modules.items():
            _set_module(model, name, mod)
        if self.plan.tied_head:
            table = self.modules["thinker.model.embed_tokens"]
            head = QuantLinear({}, "int8", table.embedding_dim, table.num_embeddings, self.device, self.dtype,
                               shared=table)
            _set_module(model, self.plan.tied_head, head)


def to_canonical(spec: LayerSpec, floats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's float tensors (``weight``, ``bias``) -> the tensors a pre-quantized checkpoint stores for it."""
    w = floats["weight"]
    if spec.kind == "heads":  # [n, H, V]: one [V, H] matrix per codebook
        return {f"{i}.{k}": v for i in range(spec.count) for k, v in quantize_weight(w[i].t(), spec.scheme).items()}
    out = quantize_weight(w, spec.scheme)
    if "bias" in floats:
        out["bias"] = floats["bias"].float()
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----- what a loaded model holds --------------------------------------------------------------------------------
PARTS = {"reasoner": "thinker.model.", "lm_head": "thinker.lm_head", "audio_encoder": "thinker.audio_tower.",
         "backbone": "backbone.", "decoder": "decoder.", "codec": "codec_model."}


def _part_of(name: str) -> str:
    return next((p for p, prefix in PARTS.items() if name.startswith(prefix)), "other")


def weight_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per part (``reasoner``, ``lm_head``, ``audio_encoder``, ``backbone``, ``decoder``, ``codec``):
    ``parameters`` (a quantized layer counts its weight's elements) and ``weight_bytes`` (the bytes held:
    parameters and quantized layers' tensors; a tensor shared by two layers counted once)."""
    out: dict[str, dict[str, int]] = {p: {"parameters": 0, "weight_bytes": 0} for p in (*PARTS, "other")}
    seen: set[int] = set()

    def add(part: str, t: torch.Tensor, count_params: bool) -> None:
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            return
        seen.add(key)
        out[part]["weight_bytes"] += t.numel() * t.element_size()
        if count_params:
            out[part]["parameters"] += t.numel()

    for name, mod in model.named_modules():
        part = _part_of(name + ".")
        if isinstance(mod, QuantLinear | QuantEmbedding):
            shared = any(t.untyped_storage().data_ptr() in seen for t in (mod.qweight,))
            if not shared:
                rows = mod.out_features if isinstance(mod, QuantLinear) else mod.num_embeddings
                cols = mod.in_features if isinstance(mod, QuantLinear) else mod.embedding_dim
                out[part]["parameters"] += rows * cols + (0 if getattr(mod, "bias", None) is None else rows)
            for t in mod.buffers(recurse=False):
                add(part, t, False)
        for _, p in mod.named_parameters(recurse=False):
            add(part, p, True)
    return {p: v for p, v in out.items() if v["parameters"] or v["weight_bytes"]}


def memory_report(device: torch.device | str | None = None) -> dict[str, int]:
    """The process's peak resident memory so far (``peak_rss_bytes``) and, on CUDA, torch's peak allocation."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def info_report(lm) -> dict:
    """What ``openchroma info --json`` reports about a :class:`openchroma.loading.LoadedModel`'s weights."""
    parts = weight_report(lm.model)
    return {"quantize": lm.quantize, "parts": parts,
            "parameters": sum(p["parameters"] for p in parts.values()),
            "weight_bytes": sum(p["weight_bytes"] for p in parts.values()),
            "unquantized_layers": list(lm.unquantized), **memory_report(lm.device)}

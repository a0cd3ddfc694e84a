"""What a checkpoint stores per quantized linear `<p>`, by type (the values of quant_model_description.json),
checked against the model's [N, K] weight as it is read, and how it runs.

| type | `<p>.weight` | scales | runs as |
|---|---|---|---|
| W8A8_MXFP8 | float8_e4m3fn [N, K] | `weight_scale` uint8 E8M0 [N, ceil(K/32)] | mxfp8 |
| W4A8_MXFP (packed) | uint8 [N, K/2], element 2i low nibble | `weight_scale` as above | mxfp4_w4a8 |
| W4A8_MXFP (early export) | float8_e4m3fn [N, K] holding FP4 values | `weight_scale` as above | mxfp8 |
| W4A4_MXFP4_DUALSCALE (mxfx's mxfp4_dual) | uint8 [N, K/2] | `weight_scale` as above, `weight_dual_scale` float32 [N, ceil(K/512), 1] | mxfp4_dual |
| W4A8_DYNAMIC | int8 [N, K], one int4 per byte, or [N/2, K], rows 2j/2j+1 in the low/high nibble | `weight_scale` [N, 1]; per group also `weight_scale_second` [N, K/group] | w4a8_dynamic |

W4A8_DYNAMIC (msmodelslim's int4; shapes and packing from its savers and vllm-ascend's loader) also
stores `weight_offset` [N, 1] and, per group, `weight_offset_second`: msmodelslim quantizes
symmetrically and writes them as zeros, and vllm-ascend never reads them, so a non-zero offset is
refused rather than run one way or the other. Its `scale_bias` feeds the int8-activation MoE kernels
only and is not used. Offsets and scale_bias are dropped once checked. The antiquant scale is
weight_scale * weight_scale_second in fp32, as vllm-ascend computes it; the group size comes from the
tensors (a multiple of 32 dividing K) and must equal the description's `group_size` where that is set
and not 0.
"""

import math
from dataclasses import dataclass

import torch

from mxfx.formats import dequantize_dual_level, dequantize_mx, pack_int4, to_paired_scales, unpack_int4
from mxfx.ops.weight_quant import dequantized_weight


class CheckpointError(ValueError):
    """A checkpoint mxfx cannot read or write; the message names the file and the tensor."""


FLOATS = (torch.float32, torch.bfloat16, torch.float16)
NUMBERS = FLOATS + (torch.int8, torch.int32, torch.int64)
# type -> required tensor suffix -> allowed dtypes
LAYOUTS = {
    "W8A8_MXFP8": {"weight": (torch.float8_e4m3fn,), "weight_scale": (torch.uint8,)},
    "W4A8_MXFP": {"weight": (torch.uint8, torch.float8_e4m3fn), "weight_scale": (torch.uint8,)},
    "W4A4_MXFP4_DUALSCALE": {"weight": (torch.uint8,), "weight_scale": (torch.uint8,), "weight_dual_scale": (torch.float32,)},
    "W4A8_DYNAMIC": {"weight": (torch.int8,), "weight_scale": FLOATS, "weight_offset": NUMBERS},
}
OPTIONAL = {"W4A8_DYNAMIC": {"weight_scale_second": FLOATS, "weight_offset_second": NUMBERS, "scale_bias": (torch.float32,)}}
# msmodelslim types mxfx knows of but cannot run yet
NOT_YET = {"W4A4_MXFP4": "MXFP4 activations", "W4A4_MXFP4_SVD": "the SVD variant"}


def suffixes(kind: str, present) -> list[str]:
    """The tensors a linear of this type stores: the required ones and the optional ones `present` has."""
    return [*LAYOUTS[kind], *(s for s in OPTIONAL.get(kind, ()) if s in present)]


@dataclass
class QuantizedWeight:
    """A linear's stored MX tensors, attached to its (dequantized) weight as `weight.mxfx_quantized`."""

    type: str
    tensors: dict[str, torch.Tensor]

    @property
    def scheme(self) -> str:
        """The mxfx.schemes.STORED_SCHEMES entry that runs these tensors."""
        if self.type == "W4A8_MXFP":  # packed FP4, or FP4 values in an E4M3 container (run as MXFP8)
            return "mxfp4_w4a8" if self.tensors["weight"].dtype == torch.uint8 else "mxfp8"
        return {"W8A8_MXFP8": "mxfp8", "W4A4_MXFP4_DUALSCALE": "mxfp4_dual"}[self.type]

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in bf16, as the model holds it."""
        t = self.tensors
        if self.scheme == "mxfp4_dual":
            weight = dequantize_dual_level(t["weight"], t["weight_dual_scale"].flatten(-2), t["weight_scale"])
        else:  # FP4 values in an E4M3 container (early W4A8_MXFP exports) are exact as E4M3
            fmt = "fp4_e2m1" if self.scheme == "mxfp4_w4a8" else "fp8_e4m3"
            weight = dequantize_mx(t["weight"], t["weight_scale"], fmt)
        return weight.to(torch.bfloat16)

    def codes(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors as the scheme's quantize_weight returns them (mxfx.schemes)."""
        t = {name: tensor.to(device) for name, tensor in self.tensors.items()}
        scale = to_paired_scales(t["weight_scale"])
        if self.scheme == "mxfp4_dual":
            return {"q": t["weight"], "level0": t["weight_dual_scale"].flatten(-2), "level1": scale}
        return {"q": t["weight"], "scale": scale}


@dataclass
class Int4Weight(QuantizedWeight):
    """A W4A8_DYNAMIC linear: `weight` int4 packed two per byte along N, int8 [N/2, K] (one-per-byte
    exports are packed when read); `weight_scale` [N, 1]; per group, `weight_scale_second` [N, K/group]."""

    group_size: int = 0  # K rows per antiquant scale; 0: one scale per output channel
    scheme = "w4a8_dynamic"

    @staticmethod
    def pack(values: torch.Tensor) -> torch.Tensor:
        """int [N, K] in [-8, 7] -> the stored `weight`, int8 [N/2, K] (rows 2j, 2j+1 in one byte)."""
        return pack_int4(values.t()).t().contiguous().view(torch.int8)

    def values(self) -> torch.Tensor:
        """int8 [N, K] in [-8, 7]: the inverse of pack."""
        return unpack_int4(self.tensors["weight"].t()).t()

    def scale(self) -> torch.Tensor:
        """The antiquant scale in fp32, [N] or [N, K/group]: weight_scale * weight_scale_second, as
        vllm-ascend multiplies them (the op then takes it in the activation's dtype)."""
        scale = self.tensors["weight_scale"].float().reshape(-1, 1)
        if "weight_scale_second" in self.tensors:
            scale = scale * self.tensors["weight_scale_second"].float()
        return scale if self.group_size else scale.flatten()

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in bf16 exactly as the device dequantizes it for bf16 activations."""
        return dequantized_weight(self.values(), self.scale().bfloat16(), None, self.group_size, torch.bfloat16)

    def codes(self, device: torch.device) -> dict[str, torch.Tensor]:
        """int8 values [N, K] and the fp32 scale laid out for the op: [N] or [K/group, N]."""
        scale = self.scale()
        return {"q": self.values().to(device), "scale": (scale.t().contiguous() if self.group_size else scale).to(device)}


def read_linear(prefix: str, kind: str, tensors, shape: torch.Size, group_size: int | None) -> QuantizedWeight:
    """The stored tensors of the linear `prefix` (a [N, K] weight in the model), checked; `tensors` reads
    a tensor by name and names its file (read._Tensors); `group_size` is the description's, if any."""
    stored, allowed = {}, LAYOUTS[kind] | OPTIONAL.get(kind, {})
    for suffix in suffixes(kind, {s for s in allowed if f"{prefix}.{s}" in tensors}):
        name = f"{prefix}.{suffix}"
        stored[suffix] = tensor = tensors[name]
        if tensor.dtype not in allowed[suffix]:
            raise CheckpointError(f"{tensors.path(name).name}: {name} is {tensor.dtype}; {kind} stores it as "
                                  f"{' or '.join(map(str, allowed[suffix]))}")

    def fail(suffix, problem):
        raise CheckpointError(f"{tensors.path(f'{prefix}.{suffix}').name}: {prefix}.{suffix} {problem}")

    n, k = shape
    if kind == "W4A8_DYNAMIC":
        return _read_int4(stored, n, k, group_size, fail)
    weight = stored["weight"]
    stored_k = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    if weight.dim() != 2 or (weight.shape[0], stored_k) != (n, k):
        fail("weight", f"has shape {list(weight.shape)}, which is not a {kind} [{n}, {k}] weight")
    expected = {"weight_scale": (n, math.ceil(k / 32)), "weight_dual_scale": (n, math.ceil(k / 512), 1)}
    for suffix, want in expected.items():
        if suffix in stored and tuple(stored[suffix].shape) != want:
            fail(suffix, f"has shape {list(stored[suffix].shape)}, expected {list(want)} for a [{n}, {k}] weight")
    return QuantizedWeight(kind, stored)


def _read_int4(stored: dict, n: int, k: int, described_group: int | None, fail) -> Int4Weight:
    weight = stored["weight"]
    if n % 8:
        fail("weight", f"belongs to a linear with N={n} outputs; npu_weight_quant_batchmatmul packs int4 8 per "
                       "int32 along N, so N must be a multiple of 8")
    if tuple(weight.shape) == (n, k):  # one value per byte: packed here, as msmodelslim's 1.0.0 exports are
        if weight.min() < -8 or weight.max() > 7:
            fail("weight", f"holds values in [{weight.min().item()}, {weight.max().item()}]; int4 is [-8, 7]")
        weight = Int4Weight.pack(weight)
    elif tuple(weight.shape) != (n // 2, k) or n % 2:
        fail("weight", f"has shape {list(weight.shape)}; W4A8_DYNAMIC stores a [{n}, {k}] weight as [{n}, {k}] "
                       f"(one int4 per byte) or [{n // 2}, {k}] (two per byte)")
    if "weight_offset_second" in stored and "weight_scale_second" not in stored:
        fail("weight_offset_second", "is stored without weight_scale_second")
    groups = stored["weight_scale_second"].shape[-1] if "weight_scale_second" in stored else 1
    for suffix, want in (("weight_scale", (n, 1)), ("weight_offset", (n, 1)),
                         ("weight_scale_second", (n, groups)), ("weight_offset_second", (n, groups))):
        if suffix in stored and tuple(stored[suffix].shape) != want:
            fail(suffix, f"has shape {list(stored[suffix].shape)}, expected {list(want)} for a [{n}, {k}] weight")
        if suffix.startswith("weight_offset") and suffix in stored and stored[suffix].any():
            fail(suffix, "is not zero: asymmetric int4 is not supported (msmodelslim writes symmetric weights "
                         "and vllm-ascend ignores offsets, so the result would depend on who runs it)")
    if "scale_bias" in stored and stored["scale_bias"].shape[0] != n:
        fail("scale_bias", f"has shape {list(stored['scale_bias'].shape)}; its first dim must be N={n}")
    kept = {suffix: stored[suffix] for suffix in ("weight_scale", "weight_scale_second") if suffix in stored}
    if groups == 1:  # one scale per channel (a single group spanning K is the same thing)
        return Int4Weight("W4A8_DYNAMIC", {"weight": weight, **kept})
    group = k // groups if groups and k % groups == 0 else 0
    if not group or group % 32 or described_group not in (None, 0, group):
        size = f"{k / groups:g}" if groups else "none"
        fail("weight_scale_second", f"has {groups} groups for K={k}, a group size of {size}; "
                                    "npu_weight_quant_batchmatmul takes a multiple of 32 that divides K, and the "
                                    f"description says {described_group}")
    return Int4Weight("W4A8_DYNAMIC", {"weight": weight, **kept}, group)

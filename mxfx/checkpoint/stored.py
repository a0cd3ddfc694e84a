"""What a checkpoint stores per quantized linear `<p>`, by type (the values of quant_model_description.json):
one record per type says which tensors it has, how they are checked against the model's [N, K]
weight, how they become the codes a scheme's quantize_weight returns (and back, for the types mxfx
writes), and which scheme runs them.

| type | `<p>.weight` | scales | runs as |
|---|---|---|---|
| W8A8_MXFP8 | float8_e4m3fn [N, K] | `weight_scale` uint8 E8M0 [N, ceil(K/32)] | mxfp8 |
| W4A8_MXFP (packed) | uint8 [N, K/2], element 2i low nibble | `weight_scale` as above | mxfp4_w4a8 |
| W4A8_MXFP (early export) | float8_e4m3fn [N, K] holding FP4 values | `weight_scale` as above | mxfp8 |
| W4A4_MXFP4 | uint8 [N, K/2], element 2i low nibble | `weight_scale` as above | mxfp4 |
| W4A4_MXFP4_DUALSCALE (mxfx) | uint8 [N, K/2] | as above, `weight_dual_scale` fp32 [N, ceil(K/512), 1] | mxfp4_dual |
| W4A8_DYNAMIC | int8 [N, K] (one int4 per byte) or [N/2, K] (rows 2j/2j+1 low/high nibble) | see below | w4a8_dynamic |

A recovered checkpoint (`mxfx quantize --recipe`) stores the codes of the transformed weight (W / s) A^-T
and what the activation needs at run time: the smoothing scale s as `<p>.mul_scale` fp32 [K] (the activation
is x * mul_scale, in its own dtype; vllm-omni's and sglang's dual-scale layout, described FLOAT), read also
from msmodelslim's own export, `<p>.div.mul_scale` with the linear under `<p>.linear.*` (read.py renames
it), and the block rotation A in the description (read.py: ROTATION). A single-level or dual-level MX type
takes the smoothing; int4 does not.

W4A8_DYNAMIC (msmodelslim's int4; shapes and packing from its savers and vllm-ascend's loader) stores
`weight_scale` [N, 1] and, per group, `weight_scale_second` [N, K/group]; also `weight_offset` [N, 1] and, per
group, `weight_offset_second`: msmodelslim quantizes symmetrically and writes them as zeros, and vllm-ascend
never reads them, so a non-zero offset is refused rather than run one way or the other. Its `scale_bias` feeds
the int8-activation MoE kernels only and is not used. Offsets and scale_bias are dropped once checked. The
antiquant scale is weight_scale * weight_scale_second in fp32, as vllm-ascend computes it; the group size
comes from the tensors (a multiple of 32 dividing K) and must equal the description's `group_size` where that
is set and not 0.
"""

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mxfx.formats import (
    dequantize_dual_level,
    dequantize_mx,
    from_paired_scales,
    pack_int4,
    to_paired_scales,
    unpack_int4,
)
from mxfx.ops.weight_quant import dequantized_weight
from mxfx.recipes import Recovered, stored_transforms
from mxfx.recovery.rotation import BlockRotation
from mxfx.schemes import MXFP4, MXFP4W4A8, MXFP8, DualLevelMXFP4, Int4WeightOnly, Scheme, Tensors


class CheckpointError(ValueError):
    """A checkpoint mxfx cannot read or write; the message names the file and the tensor."""


FLOATS = (torch.float32, torch.bfloat16, torch.float16)
NUMBERS = FLOATS + (torch.int8, torch.int32, torch.int64)
Fail = Callable[[str, str], None]  # fail(suffix, problem) raises a CheckpointError naming file and tensor
# msmodelslim types mxfx knows of but cannot run yet
NOT_YET = {"W4A4_MXFP4_SVD": "the SVD variant"}
SMOOTH = "mul_scale"  # a linear's smoothing scale, x * mul_scale before the quantizer
COMPANIONS = (SMOOTH,)  # a linear's tensors that checkpoints describe as FLOAT but that are not model parameters


@dataclass(frozen=True, eq=False)
class StoredType:
    """One stored type. required/optional: tensor suffix -> allowed dtypes."""

    name: str
    required: dict[str, tuple[torch.dtype, ...]]
    optional: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    written_for: str | None = None  # the online scheme mxfx writes as this type

    @property
    def allowed(self) -> dict[str, tuple[torch.dtype, ...]]:
        return self.required | self.optional

    def suffixes(self, present) -> list[str]:
        """The tensors a linear of this type stores: the required ones and the optional ones `present` has."""
        return [*self.required, *(s for s in self.optional if s in present)]

    def check(self, stored: Tensors, n: int, k: int, described_group: int | None, fail: Fail) -> "QuantizedWeight":
        """The linear's tensors checked against its [N, K] weight."""
        raise NotImplementedError

    def scheme(self, weight: "QuantizedWeight") -> Scheme:
        raise NotImplementedError

    def codes(self, weight: "QuantizedWeight", device: torch.device) -> Tensors:
        """The tensors as the scheme's quantize_weight returns them (mxfx.schemes)."""
        raise NotImplementedError

    def dequantize(self, weight: "QuantizedWeight") -> torch.Tensor:
        """The weight [N, K] in bf16, as the model holds it."""
        raise NotImplementedError

    def from_codes(self, codes: Tensors, k: int) -> Tensors:
        """The inverse of codes: what the scheme's quantizer returned, in this type's layout."""
        raise NotImplementedError(f"mxfx does not write {self.name}")

    def axes(self, suffix: str, shape: tuple, n: int, k: int) -> tuple[int, int | None]:
        """How a stored tensor of a [N, K] weight spans it: outputs per index of its dim 0, and K elements
        per index of its dim 1 (None: dim 1 does not run along K, it is kept whole). Tensor parallelism
        slices along these, whole groups only."""
        raise NotImplementedError


def _scale_bytes(paired: torch.Tensor, k: int) -> torch.Tensor:
    return from_paired_scales(paired, math.ceil(k / 32)).view(torch.uint8)


def _check_shapes(stored: Tensors, expected: dict[str, tuple], n: int, k: int, fail: Fail) -> None:
    for suffix, want in expected.items():
        if suffix in stored and tuple(stored[suffix].shape) != want:
            fail(suffix, f"has shape {list(stored[suffix].shape)}, expected {list(want)} for a [{n}, {k}] weight")


def _check_smooth(stored: Tensors, k: int, fail: Fail) -> None:
    """The smoothing scale, where stored: [K], finite and positive (a zero or negative one would zero or
    flip the channel the weight was divided by)."""
    if SMOOTH not in stored:
        return
    scale = stored[SMOOTH]
    if tuple(scale.shape) != (k,):
        fail(SMOOTH, f"has shape {list(scale.shape)}, expected [{k}]: one smoothing scale per input channel")
    if not (good := scale.float().isfinite() & (scale > 0)).all():
        fail(SMOOTH, f"holds {int((~good).sum())} values that are not finite and positive (first at channel "
                     f"{int((~good).nonzero()[0, 0])}): the activation it scales would be lost")


def _check_finite(stored: Tensors, suffixes: tuple[str, ...], fail: Fail) -> None:
    for suffix in suffixes:
        if suffix in stored and not (finite := stored[suffix].float().isfinite()).all():
            fail(suffix, f"holds {int((~finite).sum())} non-finite values (inf/NaN): the weights it scales "
                         "would be too")


@dataclass(frozen=True, eq=False)
class MXType(StoredType):
    """Single-level MX: E4M3 or packed FP4 codes with E8M0 scales per 32; `runs_as` maps the stored
    weight's dtype to the scheme (an E4M3 container of FP4 values, from early W4A8_MXFP exports, is exact
    as E4M3 and runs as mxfp8)."""

    runs_as: dict[torch.dtype, type[Scheme]] = field(default_factory=dict)

    def check(self, stored, n, k, described_group, fail):
        weight = stored["weight"]
        stored_k = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
        if weight.dim() != 2 or (weight.shape[0], stored_k) != (n, k):
            fail("weight", f"has shape {list(weight.shape)}, which is not a {self.name} [{n}, {k}] weight")
        _check_shapes(stored, {"weight_scale": (n, math.ceil(k / 32))}, n, k, fail)
        if (nan := (stored["weight_scale"] == 0xFF).nonzero()).numel():  # E8M0's one NaN code
            fail("weight_scale", f"holds the E8M0 NaN code 0xFF ({len(nan)} blocks, first at row {nan[0, 0].item()}, "
                                 f"block {nan[0, 1].item()}): those weights would all be NaN")
        _check_smooth(stored, k, fail)
        return QuantizedWeight(self, stored)

    def scheme(self, weight):
        return self.runs_as[weight.tensors["weight"].dtype](stored=True)

    def codes(self, weight, device):
        t = weight.tensors
        return {"q": t["weight"].to(device), "scale": to_paired_scales(t["weight_scale"].to(device))}

    def dequantize(self, weight):
        t = weight.tensors
        fmt = "fp4_e2m1" if t["weight"].dtype == torch.uint8 else "fp8_e4m3"
        return dequantize_mx(t["weight"], t["weight_scale"], fmt).to(torch.bfloat16)

    def from_codes(self, codes, k):
        return {"weight": codes["q"], "weight_scale": _scale_bytes(codes["scale"], k)}

    def axes(self, suffix, shape, n, k):
        if suffix == SMOOTH:
            raise CheckpointError(f"{SMOOTH}: tensor parallelism of a smoothed (recovered) checkpoint is not "
                                  "supported yet; load it with tp_size=1")
        if suffix == "weight":  # packed FP4 [N, K/2] or E4M3 [N, K]
            return 1, 2 if len(shape) == 2 and shape[1] * 2 == k else 1
        return 1, 32


@dataclass(frozen=True, eq=False)
class DualLevelType(MXType):
    """mxfx's dual-level MXFP4: FP4 codes, E8M0 level-1 scales per 32, fp32 level-0 scales per 512."""

    def check(self, stored, n, k, described_group, fail):
        weight = super().check(stored, n, k, described_group, fail)
        _check_shapes(stored, {"weight_dual_scale": (n, math.ceil(k / 512), 1)}, n, k, fail)
        _check_finite(stored, ("weight_dual_scale",), fail)
        return weight

    def scheme(self, weight):
        return DualLevelMXFP4(stored=True)

    def codes(self, weight, device):
        t = weight.tensors
        return {"q": t["weight"].to(device), "level0": t["weight_dual_scale"].flatten(-2).to(device),
                "level1": to_paired_scales(t["weight_scale"].to(device))}

    def dequantize(self, weight):
        t = weight.tensors
        weight = dequantize_dual_level(t["weight"], t["weight_dual_scale"].flatten(-2), t["weight_scale"])
        return weight.to(torch.bfloat16)

    def from_codes(self, codes, k):
        return {"weight": codes["q"], "weight_scale": _scale_bytes(codes["level1"], k),
                "weight_dual_scale": codes["level0"].unsqueeze(-1)}

    def axes(self, suffix, shape, n, k):
        return (1, 512) if suffix == "weight_dual_scale" else super().axes(suffix, shape, n, k)


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """int [N, K] in [-8, 7] -> the stored W4A8_DYNAMIC `weight`, int8 [N/2, K] (rows 2j, 2j+1 in one byte)."""
    return pack_int4(values.t()).t().contiguous().view(torch.int8)


@dataclass(frozen=True, eq=False)
class Int4Type(StoredType):
    """msmodelslim's W4A8_DYNAMIC: int4 packed two per byte along N, int8 [N/2, K] (one-per-byte exports
    are packed when read); `weight_scale` [N, 1]; per group, `weight_scale_second` [N, K/group]."""

    def check(self, stored, n, k, described_group, fail):
        weight = stored["weight"]
        if n % 8:
            fail("weight", f"belongs to a linear with N={n} outputs; npu_weight_quant_batchmatmul packs int4 8 per "
                           "int32 along N, so N must be a multiple of 8")
        if tuple(weight.shape) == (n, k):  # one value per byte: packed here, as msmodelslim's 1.0.0 exports are
            if weight.min() < -8 or weight.max() > 7:
                fail("weight", f"holds values in [{weight.min().item()}, {weight.max().item()}]; int4 is [-8, 7]")
            weight = pack_int4_rows(weight)
        elif tuple(weight.shape) != (n // 2, k) or n % 2:
            fail("weight", f"has shape {list(weight.shape)}; W4A8_DYNAMIC stores a [{n}, {k}] weight as [{n}, {k}] "
                           f"(one int4 per byte) or [{n // 2}, {k}] (two per byte)")
        if "weight_offset_second" in stored and "weight_scale_second" not in stored:
            fail("weight_offset_second", "is stored without weight_scale_second")
        groups = stored["weight_scale_second"].shape[-1] if "weight_scale_second" in stored else 1
        _check_shapes(stored, {"weight_scale": (n, 1), "weight_offset": (n, 1), "weight_scale_second": (n, groups),
                               "weight_offset_second": (n, groups)}, n, k, fail)
        for suffix in ("weight_offset", "weight_offset_second"):
            if suffix in stored and stored[suffix].any():
                fail(suffix, "is not zero: asymmetric int4 is not supported (msmodelslim writes symmetric weights "
                             "and vllm-ascend ignores offsets, so the result would depend on who runs it)")
        _check_finite(stored, ("weight_scale", "weight_scale_second"), fail)
        if "scale_bias" in stored and stored["scale_bias"].shape[0] != n:
            fail("scale_bias", f"has shape {list(stored['scale_bias'].shape)}; its first dim must be N={n}")
        kept = {suffix: stored[suffix] for suffix in ("weight_scale", "weight_scale_second") if suffix in stored}
        if groups == 1:  # one scale per channel (a single group spanning K is the same thing)
            return QuantizedWeight(self, {"weight": weight, **kept})
        group = k // groups if groups and k % groups == 0 else 0
        if not group or group % 32 or described_group not in (None, 0, group):
            size = f"{k / groups:g}" if groups else "none"
            fail("weight_scale_second", f"has {groups} groups for K={k}, a group size of {size}; "
                                        "npu_weight_quant_batchmatmul takes a multiple of 32 that divides K, and the "
                                        f"description says {described_group}")
        return QuantizedWeight(self, {"weight": weight, **kept}, group)

    def scheme(self, weight):
        return Int4WeightOnly(group_size=weight.group_size)

    def axes(self, suffix, shape, n, k):
        if suffix == "weight":  # one int4 per byte [N, K] or two along N [N/2, K]
            return (2 if shape[0] * 2 == n else 1), 1
        if suffix.endswith("_second"):  # per group [N, K/group]
            return 1, (k // shape[1] if len(shape) == 2 and shape[1] else None)
        return 1, None  # per channel [N, 1], scale_bias [N, ...]

    @staticmethod
    def values(weight: "QuantizedWeight") -> torch.Tensor:
        """int8 [N, K] in [-8, 7]: the inverse of pack_int4_rows."""
        return unpack_int4(weight.tensors["weight"].t()).t()

    @staticmethod
    def scale(weight: "QuantizedWeight") -> torch.Tensor:
        """The antiquant scale in fp32, [N] or [N, K/group]: weight_scale * weight_scale_second, as
        vllm-ascend multiplies them (the op then takes it in the activation's dtype)."""
        scale = weight.tensors["weight_scale"].float().reshape(-1, 1)
        if "weight_scale_second" in weight.tensors:
            scale = scale * weight.tensors["weight_scale_second"].float()
        return scale if weight.group_size else scale.flatten()

    def codes(self, weight, device):
        """int8 values [N, K] and the fp32 scale laid out for the op: [N] or [K/group, N]."""
        scale = self.scale(weight)
        return {"q": self.values(weight).to(device),
                "scale": (scale.t().contiguous() if weight.group_size else scale).to(device)}

    def dequantize(self, weight):
        """Exactly the bf16 weight the device dequantizes for bf16 activations."""
        return dequantized_weight(self.values(weight), self.scale(weight).bfloat16(), None, weight.group_size,
                                  torch.bfloat16)


_SCALE = {"weight_scale": (torch.uint8,)}
_SMOOTHED = {SMOOTH: FLOATS}
TYPES: dict[str, StoredType] = {t.name: t for t in (
    MXType("W8A8_MXFP8", {"weight": (torch.float8_e4m3fn,), **_SCALE}, _SMOOTHED, written_for="mxfp8",
           runs_as={torch.float8_e4m3fn: MXFP8}),
    MXType("W4A8_MXFP", {"weight": (torch.uint8, torch.float8_e4m3fn), **_SCALE}, _SMOOTHED, written_for="mxfp4_w4a8",
           runs_as={torch.uint8: MXFP4W4A8, torch.float8_e4m3fn: MXFP8}),
    MXType("W4A4_MXFP4", {"weight": (torch.uint8,), **_SCALE}, _SMOOTHED, written_for="mxfp4",
           runs_as={torch.uint8: MXFP4}),
    DualLevelType("W4A4_MXFP4_DUALSCALE", {"weight": (torch.uint8,), **_SCALE, "weight_dual_scale": (torch.float32,)},
                  _SMOOTHED, written_for="mxfp4_dual"),
    Int4Type("W4A8_DYNAMIC", {"weight": (torch.int8,), "weight_scale": FLOATS, "weight_offset": NUMBERS},
             {"weight_scale_second": FLOATS, "weight_offset_second": NUMBERS, "scale_bias": (torch.float32,)}),
)}
WRITTEN: dict[str, StoredType] = {t.written_for: t for t in TYPES.values() if t.written_for}  # scheme name -> type


@dataclass
class QuantizedWeight:
    """A linear's stored tensors and the record of their type (mxfx.stored_weights.StoredCodes); k: its
    input width; rotation: the block rotation of its activation, where the checkpoint has one."""

    kind: StoredType
    tensors: Tensors
    group_size: int = 0  # int4: K rows per antiquant scale; 0: one scale per output channel
    k: int = 0
    rotation: BlockRotation | None = None

    @property
    def type(self) -> str:
        return self.kind.name

    @property
    def scheme(self) -> Scheme:
        """The stored type's scheme, with the activation's smoothing and rotation where stored."""
        return stored_transforms(self.kind.scheme(self), self.k, self.tensors.get(SMOOTH), self.rotation)

    def codes(self, device: torch.device) -> Tensors:
        return self.kind.codes(self, device)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in bf16; for a recovered linear the original weight, W = W' A^T s from the
        transformed codes W', so that the model run eagerly computes what they compute before quantization."""
        weight, scheme = self.kind.dequantize(self), self.scheme
        return scheme.original_weight(weight).to(weight.dtype) if isinstance(scheme, Recovered) else weight


def read_linear(prefix: str, kind: StoredType, tensors, shape: torch.Size, group_size: int | None,
                rotation: BlockRotation | None = None) -> QuantizedWeight:
    """The stored tensors of the linear `prefix` (a [N, K] weight in the model), checked; `tensors` reads
    a tensor by name and names its file and its name there (read._Tensors); `group_size` is the
    description's, if any; `rotation` the rotation of its activation, if any."""
    stored, allowed = {}, kind.allowed
    for suffix in kind.suffixes({s for s in allowed if f"{prefix}.{s}" in tensors}):
        name = f"{prefix}.{suffix}"
        stored[suffix] = tensor = tensors[name]
        if tensor.dtype not in allowed[suffix]:
            raise CheckpointError(f"{tensors.path(name).name}: {tensors.stored_name(name)} is {tensor.dtype}; "
                                  f"{kind.name} stores it as {' or '.join(map(str, allowed[suffix]))}")

    def fail(suffix, problem):
        name = f"{prefix}.{suffix}"
        raise CheckpointError(f"{tensors.path(name).name}: {tensors.stored_name(name)} {problem}")

    n, k = shape
    if rotation is not None and k % rotation.block:
        raise CheckpointError(f"{prefix}: the checkpoint rotates its activation in blocks of {rotation.block}, which "
                              f"do not divide K={k}")
    weight = kind.check(stored, n, k, group_size, fail)
    weight.k, weight.rotation = k, rotation
    return weight


ROTATION = "mxfx_rotation"  # the description's optional entry for the activations' block rotation


def _blocks_digest(rotation: BlockRotation, k: int) -> str:
    return hashlib.sha256(rotation.activation_blocks(k).numpy().tobytes()).hexdigest()


def rotation_entry(rotation: BlockRotation, linears: dict[str, int]) -> dict:
    """The description's optional.mxfx_rotation for `linears` (prefix -> K) rotated by `rotation`: its
    parameters (the blocks follow from them and K), the linears, and per K the sha256 of the fp64
    activation blocks, which the reader compares with the blocks it regenerates."""
    return {"block": rotation.block, "kind": rotation.kind, "seed": rotation.seed, "linears": sorted(linears),
            "sha256": {str(k): _blocks_digest(rotation, k) for k in sorted(set(linears.values()))}}


def read_rotation(optional, quantized: dict[str, str], where) -> tuple[BlockRotation | None, set[str]]:
    """(rotation, the linears it applies to) from a description's `optional` header (None: no rotation),
    checked: parameters, linears the checkpoint stores quantized, and the regenerated blocks' digests (a
    random rotation regenerated differently, by another torch or LAPACK, is refused, never run)."""
    entry = optional.get(ROTATION) if isinstance(optional, dict) else None
    if entry is None:
        return None, set()
    try:
        rotation = BlockRotation(int(entry["block"]), str(entry["kind"]), int(entry["seed"]))
        linears, digests = set(entry["linears"]), {int(k): str(d) for k, d in dict(entry["sha256"]).items()}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: optional.{ROTATION} is not an mxfx rotation entry (block, kind, seed, "
                              f"linears, sha256): {error}") from error
    if unknown := sorted(linears - set(quantized)):
        raise CheckpointError(f"{where}: optional.{ROTATION} names {unknown[0]}, which the checkpoint does not "
                              "store quantized")
    for k, digest in digests.items():
        if _blocks_digest(rotation, k) != digest:
            raise CheckpointError(f"{where}: optional.{ROTATION}: the {rotation.kind} blocks regenerated for K={k} "
                                  "differ from those the checkpoint was written with (another torch or LAPACK?)")
    return rotation, linears


def shard_index(name: str, axes: tuple[int, int | None], shape: tuple, full: tuple[int, int],
                rows: tuple[int, int], cols: tuple[int, int]) -> tuple[slice, ...]:
    """The index of rows [lo, hi) of N and cols [lo, hi) of K in a stored tensor of `shape` laid out along
    `axes` (StoredType.axes; (1, 1) for a bf16 weight), for a [N, K] weight `full`. Raises naming the
    tensor where the tensor does not span `full` (a checkpoint written for another layout) or a slice
    would cut one of its groups (it is never re-quantized)."""
    index = []
    for dim, (per, (lo, hi), size, what) in enumerate(zip(axes, (rows, cols), full, "NK")):
        if dim >= len(shape) or per is None:
            break
        if shape[dim] != -(-size // per):
            raise CheckpointError(f"{name} has shape {list(shape)}, but a [{full[0]}, {full[1]}] weight stores "
                                  f"{-(-size // per)} along dim {dim}: written for another (tensor-parallel?) layout")
        if lo % per or (hi % per and hi != size):
            raise CheckpointError(f"{name}: this rank's slice [{lo}, {hi}) of {what}={size} cuts its groups of {per} "
                                  f"(stored codes are never re-quantized): choose a tp_size whose slices of {what} "
                                  f"are multiples of {per}")
        index.append(slice(lo // per, -(-hi // per)))
    return tuple(index)


def shard_stored(name: str, stored: QuantizedWeight, full: tuple[int, int], rows: tuple[int, int],
                 cols: tuple[int, int]) -> QuantizedWeight:
    """One rank's slice of a linear's stored tensors, whole groups only."""
    if stored.rotation is not None:
        raise CheckpointError(f"{name}: tensor parallelism of a rotated (recovered) checkpoint is not supported "
                              "yet; run it with tp_size=1")
    sliced = {}
    for suffix, tensor in stored.tensors.items():
        axes = stored.kind.axes(suffix, tuple(tensor.shape), *full)
        sliced[suffix] = tensor[shard_index(f"{name}.{suffix}", axes, tuple(tensor.shape), full, rows, cols)].clone()
    return QuantizedWeight(stored.kind, sliced, stored.group_size, cols[1] - cols[0])

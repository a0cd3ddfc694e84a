"""The schemes: how a weight is quantized and laid out, and which torch_npu ops quantize the activation
and do the matmul.

A scheme is a frozen value that holds all its parameters: caches of prepared weights key on the value,
so two schemes that differ in one parameter never share them, and `label` (what reports print) is apart
from that identity. A scheme is written once against an op table (`ops.<torch_npu name>`), so the same
code prepares weights eagerly, builds graph nodes when called with FX proxies, and runs on either
target. A selector (`scheme_for(weight)`) picks the scheme per linear; a plain scheme is its own.
"""

from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from mxfx.metrics import nbytes
from mxfx.ops.dtypes import ACL_FORMAT_FRACTAL_NZ, FLOAT4_E2M1FN_X2, FLOAT8_E4M3FN, FLOAT8_E8M0FNU, SCALAR_TYPE
from mxfx.selection import Skip, SkipReason
from mxfx.stored_weights import STORED_WEIGHTS
from mxfx.targets import Target

Tensors = dict[str, torch.Tensor]
FP4_ROUND_MODES = ("rint", "round", "floor")  # what the quantizers take for FP4 destinations (FP8: rint)


class _Ops:
    """`ops.npu_quant_matmul(...)` -> the target's op of that name."""

    def __init__(self, target: Target):
        self._target = target

    def __getattr__(self, name: str):
        return self._target.op(name)


def target_ops(target: Target) -> _Ops:
    return _Ops(target)


class SchemeSelector(Protocol):
    """Chooses the scheme of each linear from its weight (None: leave the linear alone)."""

    @property
    def label(self) -> str:
        ...

    def scheme_for(self, weight: torch.Tensor) -> "Scheme | None":
        ...


def tensor_key(t: torch.Tensor) -> Hashable:
    """A tensor's value as a hashable key (for small per-activation constants)."""
    return (t.dtype, tuple(t.shape), t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


@dataclass(frozen=True)
class Scheme:
    """stored=True: the weight's codes come from a checkpoint (mxfx.stored_weights), never quantized."""

    name: ClassVar[str]
    description: ClassVar[str]
    k_multiple: ClassVar[int]  # K must be a multiple of this (32: the MX block; 512: the dual-level level-0 block)
    weight_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16, torch.float32)
    # what the NPU quantizers take
    activation_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16)
    activation_constants: ClassVar[tuple[str, ...]] = ()  # prepared tensors the activation quantization reads

    stored: bool = False
    weight_round_mode: str = "rint"  # how the online weight quantizer rounds (torch_npu's default: rint)
    weight_round_modes: ClassVar[tuple[str, ...]] = ("rint",)

    def __post_init__(self) -> None:
        if self.weight_round_mode not in self.weight_round_modes:
            raise ValueError(f"scheme {self.name}: weight_round_mode must be one of {self.weight_round_modes}, "
                             f"got {self.weight_round_mode!r}")

    @property
    def label(self) -> str:
        label = f"modelslim/{self.name}" if self.stored else self.name
        return label if self.weight_round_mode == "rint" else f"{label} (weights round {self.weight_round_mode})"

    def scheme_for(self, weight: torch.Tensor) -> "Scheme":
        if not self.stored and (stored := STORED_WEIGHTS.get(weight)) is not None:
            raise ValueError(f"the weight was loaded from a quantized checkpoint ({stored.type}); scheme {self.label} "
                             "would quantize its dequantized values again: compile it with scheme='modelslim'")
        return self

    def skip(self, k: int) -> Skip | None:
        if k % self.k_multiple:
            return Skip(SkipReason.K_RULE, f"K={k} is not a multiple of {self.k_multiple} ({self.name})")
        return None

    # -- weights -----------------------------------------------------------------------------------
    def quantize_weight(self, target: Target, weight: torch.Tensor) -> Tensors:
        """The weight's codes and scales as the torch_npu quantizer returns them."""
        raise NotImplementedError(f"scheme {self.name} has no online weight quantization")

    def layout(self, target: Target, codes: Tensors, bias: torch.Tensor | None, dtype: torch.dtype) -> Tensors:
        """The tensors the matmul reads: the codes laid out for the NPU op, and the bias, for
        activations of `dtype`."""
        raise NotImplementedError

    def weight_codes(self, target: Target, weight: torch.Tensor, dtype: torch.dtype) -> Tensors:
        """The stored codes, or the weight (in the activations' dtype) quantized."""
        if not self.stored:
            return self.quantize_weight(target, weight.to(dtype))
        stored = STORED_WEIGHTS.get(weight)
        if stored is None:
            raise ValueError(f"scheme {self.label}: the weight has no stored codes (load it with mxfx.checkpoint.load)")
        return stored.codes(weight.device)

    def fake_codes(self, target: Target, weight: torch.Tensor, dtype: torch.dtype, fake_mode) -> Tensors:
        """weight_codes as fake tensors of fake_mode, without quantizing: what the quantizer's fake kernel
        returns for the weight, or the stored codes' metadata."""
        if self.stored:
            return {name: fake_mode.from_tensor(t, static_shapes=True)
                    for name, t in self.weight_codes(target, weight, dtype).items()}
        return self.quantize_weight(target, fake_mode.from_tensor(weight, static_shapes=True).to(dtype))

    def weight_bytes(self, prepared: Tensors) -> int:
        """The weight's bytes as the matmul reads them: codes and scales, not the bias nor the per-activation
        constants (a rotation or smooth scale is shared by every linear on the activation)."""
        return nbytes(t for name, t in prepared.items() if name != "bias" and name not in self.activation_constants)

    def output_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias as the matmul adds it (a recipe that rotates the output rows rotates it too)."""
        return bias

    def output_rows(self, y: torch.Tensor) -> torch.Tensor:
        """y [..., N], the unquantized linear's output, as this scheme's linear computes it (a recipe's fold
        transforms its rows: recipes.Recovered), to compare the two."""
        return y

    def folded_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K], the model's input to the linear, as it arrives where a recipe's fold transformed it
        upstream (recipes.Recovered), to run this scheme's linear alone."""
        return x

    def prepare(self, target: Target, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Tensors:
        """What the matmul reads, for activations of `dtype`. Under no_grad: prepared tensors must not
        hold the weights through an autograd graph."""
        with torch.no_grad():
            return self.layout(target, self.weight_codes(target, weight, dtype), self.output_bias(bias), dtype)

    def fake_prepare(self, target: Target, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                     fake_mode) -> Tensors:
        """prepare with the weight's tensors as fakes of fake_mode (their shapes, dtypes and strides), nothing
        quantized; the bias and the per-activation constants are real (small, and their values key the
        activation's quantization). What a rewrite builds its graph from before the weights are prepared."""
        with torch.no_grad():
            return self.layout(target, self.fake_codes(target, weight, dtype, fake_mode), self.output_bias(bias), dtype)

    # -- activations and the matmul ----------------------------------------------------------------
    @property
    def activation_rule(self) -> Hashable:
        """What the activation quantization is (None: the activation is not quantized)."""
        raise NotImplementedError

    def activation_key(self, prepared: Tensors) -> Hashable:
        """Linears on one activation share its quantization when these keys are equal: the rule and
        the value of every per-activation constant (a smooth scale, a rotation)."""
        return (self.activation_rule, *(tensor_key(prepared[name]) for name in self.activation_constants))

    def quantize_activation(self, target: Target, x2d, prepared: Tensors):
        """The activation's quantized tensors, as a tuple the matmul indexes."""
        raise NotImplementedError

    def matmul(self, target: Target, activation, prepared: Tensors, dtype: torch.dtype):
        """[M, N] in `dtype` (the activation's)."""
        raise NotImplementedError

    def linear(self, target: Target, x: torch.Tensor, prepared: Tensors) -> torch.Tensor:
        """The quantized linear on a tensor of any rank [..., K] -> [..., N] in x's dtype: what the
        rewritten graph computes (the rewrite emits the same calls, sharing activation quantizations)."""
        x2d = x.reshape(-1, x.shape[-1])
        y = self.matmul(target, self.quantize_activation(target, x2d, prepared), prepared, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _fp32_bias(prepared: Tensors, bias: torch.Tensor | None) -> Tensors:
    return prepared if bias is None else {**prepared, "bias": bias.float()}


@dataclass(frozen=True)
class DualLevelMXFP4(Scheme):
    """W4A4 dual-level MXFP4 (the seed PR's online 'W4A8 MXFP'; 'A8' names the E8M0 level-1 scale)."""

    name: ClassVar[str] = "mxfp4_dual"
    description: ClassVar[str] = "dual-level MXFP4 W4A4 (npu_dual_level_quant_matmul)"
    k_multiple: ClassVar[int] = 512
    weight_round_modes: ClassVar[tuple[str, ...]] = FP4_ROUND_MODES

    def quantize_weight(self, target, weight):
        quantize = target_ops(target).npu_dynamic_dual_level_mx_quant
        q, level0, level1 = quantize(weight, round_mode=self.weight_round_mode)
        return {"q": q, "level0": level0, "level1": level1}

    def layout(self, target, codes, bias, dtype):
        return _fp32_bias({
            "weight": target_ops(target).npu_format_cast(codes["q"].view(torch.int8), ACL_FORMAT_FRACTAL_NZ),
            # [N, K/512] -> [K/512, N]; no squeeze(-1): level0 has no trailing 1 (K == 512 stays 2-D)
            "weight_level0_scale": codes["level0"].transpose(0, 1).contiguous(),
            "weight_scale": codes["level1"],
        }, bias)

    @property
    def activation_rule(self):
        return ("npu_dynamic_dual_level_mx_quant", "rint")

    def quantize_activation(self, target, x2d, prepared):
        return target_ops(target).npu_dynamic_dual_level_mx_quant(x2d)

    def matmul(self, target, activation, prepared, dtype):
        return target_ops(target).npu_dual_level_quant_matmul(
            activation[0], prepared["weight"], activation[1], prepared["weight_level0_scale"],
            activation[2], prepared["weight_scale"], bias=prepared.get("bias"), output_dtype=SCALAR_TYPE[dtype],
        )


@dataclass(frozen=True)
class _MXActivation(Scheme):
    """Single-level MX activations (npu_dynamic_mx_quant, OCP floor scale; MXFP8 E4M3 unless a scheme
    says otherwise) into npu_quant_matmul."""

    k_multiple: ClassVar[int] = 32
    weight_dst_type: ClassVar[int]
    activation_dst_type: ClassVar[int] = FLOAT8_E4M3FN
    activation_round_mode: ClassVar[str] = "rint"

    @property
    def activation_rule(self):
        return ("npu_dynamic_mx_quant", self.activation_dst_type, self.activation_round_mode, 0)

    def quantize_activation(self, target, x2d, prepared):
        return target_ops(target).npu_dynamic_mx_quant(x2d, dst_type=self.activation_dst_type,
                                                       round_mode=self.activation_round_mode)

    def quantize_weight(self, target, weight):
        q, scale = target_ops(target).npu_dynamic_mx_quant(weight, dst_type=self.weight_dst_type,
                                                           round_mode=self.weight_round_mode)
        return {"q": q, "scale": scale}

    def _quant_matmul(self, target, activation, prepared, dtype, **mode):
        return target_ops(target).npu_quant_matmul(
            activation[0], prepared["weight"], prepared["weight_scale"], pertoken_scale=activation[1],
            bias=prepared.get("bias"), output_dtype=SCALAR_TYPE[dtype], pertoken_scale_dtype=FLOAT8_E8M0FNU,
            scale_dtype=FLOAT8_E8M0FNU, **mode,
        )


@dataclass(frozen=True)
class MXFP8(_MXActivation):
    """W8A8 MXFP8: weight a [K, N] view of E4M3 [N, K], scale the [K/64, N, 2] view; bias in fp32."""

    name: ClassVar[str] = "mxfp8"
    description: ClassVar[str] = "W8A8 MXFP8 (npu_quant_matmul)"
    weight_dst_type: ClassVar[int] = FLOAT8_E4M3FN

    def layout(self, target, codes, bias, dtype):
        return _fp32_bias({"weight": codes["q"].t(), "weight_scale": codes["scale"].transpose(0, 1)}, bias)

    def matmul(self, target, activation, prepared, dtype):
        return self._quant_matmul(target, activation, prepared, dtype, group_sizes=[1, 1, 32])


@dataclass(frozen=True)
class MXFP4W4A8(_MXActivation):
    """MXFP4 weight x MXFP8 activation (vllm-ascend W4A8_MXFP): the packed FP4 weight NZ-cast as FP4
    elements (customize_dtype float8_e4m3fn, input_dtype float4_e2m1fn_x2), then transposed; the bias in
    the activations' dtype, shape [1, N]."""

    name: ClassVar[str] = "mxfp4_w4a8"
    description: ClassVar[str] = "MXFP4 weight x MXFP8 activation (npu_quant_matmul)"
    weight_dst_type: ClassVar[int] = FLOAT4_E2M1FN_X2
    weight_round_modes: ClassVar[tuple[str, ...]] = FP4_ROUND_MODES

    def layout(self, target, codes, bias, dtype):
        q = target_ops(target).npu_format_cast(codes["q"], ACL_FORMAT_FRACTAL_NZ, customize_dtype=FLOAT8_E4M3FN,
                                               input_dtype=FLOAT4_E2M1FN_X2)
        prepared = {"weight": q.transpose(-1, -2), "weight_scale": codes["scale"].transpose(0, 1)}
        if bias is not None:
            prepared["bias"] = bias.to(dtype).reshape(1, -1)
        return prepared

    def matmul(self, target, activation, prepared, dtype):
        return self._quant_matmul(target, activation, prepared, dtype, x2_dtype=FLOAT4_E2M1FN_X2,
                                  group_sizes=[0, 0, 32])


@dataclass(frozen=True)
class MXFP4(_MXActivation):
    """Single-level W4A4 MXFP4 as vllm-ascend's W4A4_MXFP4 linear runs it: FP4 activations quantized with
    round_mode="round", the packed FP4 weight as a [K/2, N] view and its scale as the [K/64, N, 2] view
    (vllm-ascend's layout with NZ off), FP4 x FP4 in npu_quant_matmul, the bias in fp32."""

    name: ClassVar[str] = "mxfp4"
    description: ClassVar[str] = "single-level MXFP4 W4A4 (npu_quant_matmul)"
    weight_dst_type: ClassVar[int] = FLOAT4_E2M1FN_X2
    weight_round_modes: ClassVar[tuple[str, ...]] = FP4_ROUND_MODES
    activation_dst_type: ClassVar[int] = FLOAT4_E2M1FN_X2
    activation_round_mode: ClassVar[str] = "round"

    def layout(self, target, codes, bias, dtype):
        return _fp32_bias({"weight": codes["q"].transpose(0, 1), "weight_scale": codes["scale"].transpose(0, 1)}, bias)

    def matmul(self, target, activation, prepared, dtype):
        return self._quant_matmul(target, activation, prepared, dtype, x1_dtype=FLOAT4_E2M1FN_X2,
                                  x2_dtype=FLOAT4_E2M1FN_X2, group_sizes=[1, 1, 32])


@dataclass(frozen=True)
class Int4WeightOnly(Scheme):
    """msmodelslim W4A8_DYNAMIC as vllm-ascend and sglang serve a dense linear: int4 weights, activations
    not quantized (so W4A16 in fact), npu_weight_quant_batchmatmul with the weight packed 8 per int32
    [K, N/8] and the antiquant scale, per channel [N] or per group [K/group, N], in the activation's
    dtype; the bias in fp32 (bf16 activations) or fp16. Stored codes only."""

    name: ClassVar[str] = "w4a8_dynamic"
    description: ClassVar[str] = "int4 weight x bf16/fp16 activation (npu_weight_quant_batchmatmul), stored weights"
    k_multiple: ClassVar[int] = 1

    group_size: int = 0  # K rows per antiquant scale; 0: one scale per output channel
    stored: bool = True

    @property
    def label(self) -> str:
        return f"modelslim/{self.name} ({f'group {self.group_size}' if self.group_size else 'per channel'})"

    def layout(self, target, codes, bias, dtype):  # codes: int8 values [N, K], fp32 scale [N] or [K/group, N]
        prepared = {
            "weight": target_ops(target).npu_convert_weight_to_int4pack(codes["q"].t().contiguous().to(torch.int32)),
            "antiquant_scale": codes["scale"].to(dtype),
        }
        if bias is not None:
            prepared["bias"] = bias.to(torch.float32 if dtype == torch.bfloat16 else dtype)
        return prepared

    @property
    def activation_rule(self):
        return None

    def quantize_activation(self, target, x2d, prepared):
        return (x2d,)

    def matmul(self, target, activation, prepared, dtype):
        return target_ops(target).npu_weight_quant_batchmatmul(
            activation[0], prepared["weight"], prepared["antiquant_scale"], bias=prepared.get("bias"),
            antiquant_group_size=self.group_size,
        )


@dataclass(frozen=True)
class Modelslim:
    """The selector for quantized checkpoints (msmodelslim or `mxfx quantize`): each linear runs the scheme
    of its stored type, fed with the stored codes; linears stored as FLOAT are left alone."""

    label: ClassVar[str] = "modelslim"
    description: ClassVar[str] = "per linear, the stored type of a quantized checkpoint"

    def scheme_for(self, weight: torch.Tensor) -> Scheme | None:
        stored = STORED_WEIGHTS.get(weight)
        return None if stored is None else stored.scheme


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (DualLevelMXFP4(), MXFP4W4A8(), MXFP8(), MXFP4())}
MODELSLIM = Modelslim()


def get_scheme(scheme: "str | Scheme | SchemeSelector") -> "Scheme | SchemeSelector":
    if not isinstance(scheme, str):
        if not hasattr(scheme, "scheme_for"):
            raise TypeError(f"a scheme is a name, a Scheme or a selector with scheme_for(weight); got {scheme!r}")
        return scheme
    if scheme == MODELSLIM.label:
        return MODELSLIM
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join([*SCHEMES, MODELSLIM.label])}")
    return SCHEMES[scheme]

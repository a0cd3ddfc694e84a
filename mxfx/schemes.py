"""The online schemes: how a weight is prepared and which torch_npu ops quantize the activation and do
the matmul. A scheme is written once against an op table (`ops.<torch_npu name>`), so the same code
prepares weights eagerly, builds graph nodes when called with FX proxies, and runs on either target."""

from dataclasses import dataclass, replace

import torch

from mxfx.ops.dtypes import ACL_FORMAT_FRACTAL_NZ, FLOAT4_E2M1FN_X2, FLOAT8_E4M3FN, FLOAT8_E8M0FNU


class _Ops:
    """`ops.npu_quant_matmul(...)` -> the target's op of that name."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        return self._target.op(name)


def target_ops(target) -> _Ops:
    return _Ops(target)


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    k_multiple: int  # K must be a multiple of this (32: the MX block; 512: the dual-level level-0 block)
    activation: str  # schemes with the same activation quantization can share it; "" for none

    def skip_reason(self, k: int) -> str | None:
        if k % self.k_multiple:
            return f"K={k} is not a multiple of {self.k_multiple} ({self.name})"
        return None

    def for_weight(self, weight: torch.Tensor) -> "Scheme | None":
        """The scheme that serves this weight (None: leave the linear alone); one scheme serves all here."""
        return self

    def quantize_weight(self, target, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weight's codes and scales as the torch_npu quantizer returns them."""
        raise NotImplementedError

    def prepare_weight(self, target, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The tensors the matmul reads: quantize_weight's, laid out for the NPU op, and the bias."""
        raise NotImplementedError

    def quantize_activation(self, target, x2d):
        """The activation's quantized tensors, as a tuple the matmul indexes."""
        raise NotImplementedError

    def matmul(self, target, activation, prepared: dict, output_dtype: int):
        raise NotImplementedError


class DualLevelMXFP4(Scheme):
    """W4A4 dual-level MXFP4 (the seed PR's online 'W4A8 MXFP'; 'A8' names the E8M0 level-1 scale)."""

    def quantize_weight(self, target, weight):
        q, level0, level1 = target_ops(target).npu_dynamic_dual_level_mx_quant(weight)
        return {"q": q, "level0": level0, "level1": level1}

    def prepare_weight(self, target, weight, bias):
        codes = self.quantize_weight(target, weight)
        prepared = {
            "weight": target_ops(target).npu_format_cast(codes["q"].view(torch.int8), ACL_FORMAT_FRACTAL_NZ),
            # [N, K/512] -> [K/512, N]; no squeeze(-1): level0 has no trailing 1 (K == 512 stays 2-D)
            "weight_level0_scale": codes["level0"].transpose(0, 1).contiguous(),
            "weight_scale": codes["level1"],
        }
        if bias is not None:
            prepared["bias"] = bias.float()
        return prepared

    def quantize_activation(self, target, x2d):
        return target_ops(target).npu_dynamic_dual_level_mx_quant(x2d)

    def matmul(self, target, activation, prepared, output_dtype):
        return target_ops(target).npu_dual_level_quant_matmul(
            activation[0], prepared["weight"], activation[1], prepared["weight_level0_scale"],
            activation[2], prepared["weight_scale"], bias=prepared.get("bias"), output_dtype=output_dtype,
        )


class _MXActivation(Scheme):
    """MXFP8 E4M3 activations (npu_dynamic_mx_quant, OCP floor scale) into npu_quant_matmul."""

    weight_dst_type: int

    def quantize_activation(self, target, x2d):
        return target_ops(target).npu_dynamic_mx_quant(x2d, dst_type=FLOAT8_E4M3FN)

    def quantize_weight(self, target, weight):
        q, scale = target_ops(target).npu_dynamic_mx_quant(weight, dst_type=self.weight_dst_type)
        return {"q": q, "scale": scale}

    def _quant_matmul(self, target, activation, prepared, output_dtype, **mode):
        return target_ops(target).npu_quant_matmul(
            activation[0], prepared["weight"], prepared["weight_scale"], pertoken_scale=activation[1],
            bias=prepared.get("bias"), output_dtype=output_dtype, pertoken_scale_dtype=FLOAT8_E8M0FNU,
            scale_dtype=FLOAT8_E8M0FNU, **mode,
        )


class MXFP8(_MXActivation):
    """W8A8 MXFP8: weight a [K, N] view of E4M3 [N, K], scale the [K/64, N, 2] view; bias in fp32."""

    weight_dst_type = FLOAT8_E4M3FN

    def prepare_weight(self, target, weight, bias):
        codes = self.quantize_weight(target, weight)
        prepared = {"weight": codes["q"].t(), "weight_scale": codes["scale"].transpose(0, 1)}
        if bias is not None:
            prepared["bias"] = bias.float()
        return prepared

    def matmul(self, target, activation, prepared, output_dtype):
        return self._quant_matmul(target, activation, prepared, output_dtype, group_sizes=[1, 1, 32])


class MXFP4W4A8(_MXActivation):
    """MXFP4 weight x MXFP8 activation (vllm-ascend W4A8_MXFP): packed FP4 weight as a [K/2, N] view,
    NZ-cast before the transpose on the NPU; the bias in the output dtype, shape [1, N]."""

    weight_dst_type = FLOAT4_E2M1FN_X2

    def prepare_weight(self, target, weight, bias):
        codes = self.quantize_weight(target, weight)
        q = codes["q"]
        if target.nz_fp4_quant_matmul_weight:
            q = target_ops(target).npu_format_cast(q, ACL_FORMAT_FRACTAL_NZ, customize_dtype=FLOAT8_E4M3FN,
                                                   input_dtype=FLOAT4_E2M1FN_X2)
        prepared = {"weight": q.transpose(-1, -2), "weight_scale": codes["scale"].transpose(0, 1)}
        if bias is not None:
            prepared["bias"] = bias.to(weight.dtype).reshape(1, -1)
        return prepared

    def matmul(self, target, activation, prepared, output_dtype):
        return self._quant_matmul(
            target, activation, prepared, output_dtype, x2_dtype=FLOAT4_E2M1FN_X2, group_sizes=[0, 0, 32]
        )


class _Stored:
    """A scheme whose weight codes come from a checkpoint (mxfx.checkpoint attaches them to the weight
    as `weight.mxfx_quantized`) instead of being quantized: the rest of the scheme is unchanged."""

    def quantize_weight(self, target, weight):
        stored = getattr(weight, "mxfx_quantized", None)
        if stored is None:
            raise ValueError(f"scheme {self.name}: the weight carries no checkpoint tensors (mxfx.checkpoint.load)")
        return stored.codes(weight.device)


class _StoredDualLevel(_Stored, DualLevelMXFP4):
    pass


class _StoredMXFP8(_Stored, MXFP8):
    pass


class _StoredMXFP4W4A8(_Stored, MXFP4W4A8):
    pass


STORED_INT4 = "modelslim/w4a8_dynamic"


@dataclass(frozen=True)
class _StoredInt4WeightOnly(_Stored, Scheme):
    """msmodelslim W4A8_DYNAMIC as vllm-ascend and sglang serve a dense linear: int4 weights, activations
    not quantized (so W4A16 in fact), npu_weight_quant_batchmatmul with the weight packed 8 per int32
    [K, N/8] and the antiquant scale, per channel [N] or per group [K/group, N], in the activation's
    dtype; the bias in fp32 (bf16 activations) or fp16."""

    group_size: int = 0  # 0: one scale per output channel

    def for_weight(self, weight):
        group = getattr(getattr(weight, "mxfx_quantized", None), "group_size", None)
        if group is None:  # not an int4 checkpoint weight: quantize_weight says what is wrong
            return self
        return replace(self, name=f"{STORED_INT4} ({f'group {group}' if group else 'per channel'})", group_size=group)

    def prepare_weight(self, target, weight, bias):
        codes = self.quantize_weight(target, weight)  # int8 values [N, K], fp32 scale [N] or [K/group, N]
        prepared = {
            "weight": target_ops(target).npu_convert_weight_to_int4pack(codes["q"].t().contiguous().to(torch.int32)),
            "antiquant_scale": codes["scale"].to(weight.dtype),
        }
        if bias is not None:
            prepared["bias"] = bias.to(torch.float32 if weight.dtype == torch.bfloat16 else weight.dtype)
        return prepared

    def quantize_activation(self, target, x2d):
        return (x2d,)

    def matmul(self, target, activation, prepared, output_dtype):
        return target_ops(target).npu_weight_quant_batchmatmul(
            activation[0], prepared["weight"], prepared["antiquant_scale"], bias=prepared.get("bias"),
            antiquant_group_size=self.group_size,
        )


class Modelslim(Scheme):
    """Checkpoints quantized ahead of time (msmodelslim or `mxfx quantize`): each linear runs the scheme
    of its stored type, fed with the stored codes; linears stored as FLOAT are left alone."""

    def for_weight(self, weight):
        stored = getattr(weight, "mxfx_quantized", None)
        return None if stored is None else STORED_SCHEMES[stored.scheme].for_weight(weight)


SCHEMES = {
    scheme.name: scheme
    for scheme in (
        DualLevelMXFP4("mxfp4_dual", "dual-level MXFP4 W4A4 (npu_dual_level_quant_matmul)", 512, "dual_level"),
        MXFP4W4A8("mxfp4_w4a8", "MXFP4 weight x MXFP8 activation (npu_quant_matmul)", 32, "mxfp8"),
        MXFP8("mxfp8", "W8A8 MXFP8 (npu_quant_matmul)", 32, "mxfp8"),
    )
}


def _stored(cls, online: str) -> Scheme:
    scheme = SCHEMES[online]
    return cls(f"modelslim/{online}", f"{scheme.description}, stored weights", scheme.k_multiple, scheme.activation)


STORED_SCHEMES = {
    "mxfp4_dual": _stored(_StoredDualLevel, "mxfp4_dual"),
    "mxfp4_w4a8": _stored(_StoredMXFP4W4A8, "mxfp4_w4a8"),
    "mxfp8": _stored(_StoredMXFP8, "mxfp8"),
    "w4a8_dynamic": _StoredInt4WeightOnly(
        STORED_INT4, "int4 weight x bf16/fp16 activation (npu_weight_quant_batchmatmul), stored weights",
        1, ""),
}
# Modelslim's own K rule and activation are unused: each linear takes its stored type's scheme
MODELSLIM = Modelslim("modelslim", "per linear, the stored type of a quantized checkpoint", 1, "")


def get_scheme(scheme: "str | Scheme") -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    if scheme == MODELSLIM.name:
        return MODELSLIM
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join([*SCHEMES, MODELSLIM.name])}")
    return SCHEMES[scheme]

"""mxfx::npu_swiglu_mx_quant: torch_npu's fused SwiGLU + MX quantization (Ascend 950), argument for argument
(op-plugin op_plugin_functions.yaml, _meta_registrations.py), swiglu_mode 0 on the last axis as the A5 kernel
computes it (hicann/ops-nn quant/swiglu_mx_quant, op_kernel/arch35 ComputeVfSwigluV1, and the golden):

- x [..., 2H] splits into halves A (first) and B (second); the gate is A when activate_left, else B (the
  default activate_left=False activates the *second* half, unlike npu_swiglu, which is silu(A) * B);
- out = gate / (1 + exp(-gate)) * other in fp32, cast once (RINT) to x's dtype, then MX-quantized as
  npu_dynamic_mx_quant quantizes that tensor (block 32, scale_alg 0 or 1);
- the reference rounds exp correctly to fp32; the device's Exp may differ by an ulp, visible only where
  the product falls on a bf16 rounding boundary.

Outputs (y, mxscale): y float8_e4m3fn [..., H] or packed FP4 uint8 [..., H/2], mxscale uint8
[..., ceil(H/64), 2]. Not emulated, refused by name: group_index (MoE), swiglu_mode 1-3 (clamped
variants), activate_dim or axis other than the last."""

import torch

from .quant import fused_mx_args, mx_quantized, mx_quantized_fake

torch.library.define(
    "mxfx::npu_swiglu_mx_quant",
    "(Tensor x, *, Tensor? group_index=None, int activate_dim=-1, bool activate_left=False, int swiglu_mode=0, "
    "float clamp_limit=7.0, float glu_alpha=1.702, float glu_bias=1.0, int group_mode=0, int axis=-1, "
    "int dst_type=296, str round_mode=\"rint\", int scale_alg=0, float max_dtype_value=0) -> (Tensor, Tensor)",
)

OP = "npu_swiglu_mx_quant"


def _check(x, group_index, activate_dim, swiglu_mode, axis, dst_type, round_mode, scale_alg, max_dtype_value):
    if x.dtype not in (torch.bfloat16, torch.float16) or not 2 <= x.dim() <= 7 or x.numel() == 0:
        raise ValueError(f"{OP}: x must be a non-empty 2-7-D bf16/fp16 tensor, got {x.dtype} {list(x.shape)}")
    last = x.dim() - 1
    for name, value in (("activate_dim", activate_dim), ("axis", axis)):
        if value not in (-1, last):
            raise ValueError(f"{OP}: only the last axis is emulated, got {name}={value}")
    if group_index is not None or swiglu_mode != 0:
        raise ValueError(f"{OP}: only swiglu_mode=0 without group_index is emulated, got swiglu_mode={swiglu_mode}"
                         f"{' and a group_index' if group_index is not None else ''}")
    if not max_dtype_value >= 0:
        raise ValueError(f"{OP}: max_dtype_value must be >= 0, got {max_dtype_value!r}")
    fmt, alg = fused_mx_args(OP, dst_type, scale_alg, round_mode)
    multiple = 4 if fmt == "fp4_e2m1" else 2  # two halves; FP4 packs each half two values a byte
    if x.shape[-1] % multiple:
        raise ValueError(f"{OP}: the last dim must be a multiple of {multiple} for {fmt}, got {x.shape[-1]}")
    return fmt, alg


def swiglu_fp32(x: torch.Tensor, activate_left: bool) -> torch.Tensor:
    """The kernel's SwiGLU in fp32: gate / (1 + exp(-gate)) * other."""
    first, second = x.float().chunk(2, dim=-1)
    gate, other = (first, second) if activate_left else (second, first)
    return gate / (torch.exp(-gate.double()).float() + 1.0) * other


@torch.library.register_kernel("mxfx::npu_swiglu_mx_quant", ("cpu", "cuda"))
def _swiglu_mx_quant(x, *, group_index=None, activate_dim=-1, activate_left=False, swiglu_mode=0, clamp_limit=7.0,
                     glu_alpha=1.702, glu_bias=1.0, group_mode=0, axis=-1, dst_type=296, round_mode="rint",
                     scale_alg=0, max_dtype_value=0.0):
    fmt, alg = _check(x, group_index, activate_dim, swiglu_mode, axis, dst_type, round_mode, scale_alg, max_dtype_value)
    return mx_quantized(swiglu_fp32(x, activate_left).to(x.dtype), fmt, alg, round_mode)


@torch.library.register_fake("mxfx::npu_swiglu_mx_quant")
def _swiglu_mx_quant_fake(x, *, group_index=None, activate_dim=-1, activate_left=False, swiglu_mode=0,
                          clamp_limit=7.0, glu_alpha=1.702, glu_bias=1.0, group_mode=0, axis=-1, dst_type=296,
                          round_mode="rint", scale_alg=0, max_dtype_value=0.0):
    fmt, _ = _check(x, group_index, activate_dim, swiglu_mode, axis, dst_type, round_mode, scale_alg, max_dtype_value)
    return mx_quantized_fake(x[..., : x.shape[-1] // 2], fmt)

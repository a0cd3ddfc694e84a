"""mxfx::npu_rms_norm_dynamic_mx_quant and mxfx::npu_add_rms_norm_dynamic_mx_quant: torch_npu's fused
RMSNorm + MX quantization (Ascend 950), argument for argument (op-plugin op_plugin_functions.yaml,
_meta_registrations.py), with the A5 kernels' arithmetic (hicann/ops-nn norm/rms_norm_dynamic_mx_quant and
norm/add_rms_norm_dynamic_mx_quant, op_kernel/arch35):

- add variant: x = x1 + x2 in fp32; x_out is x cast once to x1's dtype, but the norm reads the fp32 sum
  (CalculateXAdd keeps both), so it is not the norm of the rounded residual an unfused graph computes;
- rstd = 1 / sqrt(sum(x^2) * fp32(1/K) + fp32(epsilon)) in fp32;
- y = (x * rstd) * gamma (+ beta) in fp32 with gamma read as fp32, cast once to x's dtype (unlike
  transformers' Qwen3RMSNorm, which casts x * rstd to bf16 and multiplies by the weight in bf16);
- that y is MX-quantized exactly as npu_dynamic_mx_quant quantizes a bf16/fp16 tensor (block 32,
  scale_alg 0 or 1; the golden and ComputeMaxExpOCP read the stored x-dtype y).

The device sums the squares in its own fold order and refines rsqrt by Newton-Raphson; the reference
sums them in fp64 and rounds once, and rounds 1/sqrt correctly, so rstd can differ from the device's by an
ulp and y by one bf16 ulp where the product falls on a rounding boundary.

Outputs: (y, mxscale, rstd) and (y, x_out, mxscale, rstd), y float8_e4m3fn [..., K] or packed FP4 uint8
[..., K/2], mxscale uint8 [..., ceil(K/64), 2], rstd fp32 [..., 1] (the meta registrations' shapes;
torch_npu's eager op returns an empty rstd unless x requires grad)."""

import torch

from .quant import fused_mx_args, mx_quantized, mx_quantized_fake

torch.library.define(
    "mxfx::npu_rms_norm_dynamic_mx_quant",
    "(Tensor x, Tensor gamma, *, Tensor? beta=None, float epsilon=1e-06, int scale_alg=0, str round_mode=\"rint\", "
    "int dst_type=296) -> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "mxfx::npu_add_rms_norm_dynamic_mx_quant",
    "(Tensor x1, Tensor x2, Tensor gamma, *, Tensor? beta=None, float epsilon=1e-06, int scale_alg=0, "
    "str round_mode=\"rint\", int dst_type=296) -> (Tensor, Tensor, Tensor, Tensor)",
)

_X_DTYPES = (torch.bfloat16, torch.float16)


def _check(op, x, gamma, beta, dst_type, scale_alg, round_mode) -> tuple[str, str]:
    if x.dtype not in _X_DTYPES or not 1 <= x.dim() <= 7 or x.numel() == 0:
        raise ValueError(f"{op}: x must be a non-empty 1-7-D bf16/fp16 tensor, got {x.dtype} {list(x.shape)}")
    if gamma.dim() != 1 or gamma.shape[0] != x.shape[-1] or gamma.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{op}: gamma must be 1-D [{x.shape[-1]}] in x's dtype or fp32, got {gamma.dtype} "
                         f"{list(gamma.shape)}")
    if beta is not None and (beta.shape != gamma.shape or beta.dtype != gamma.dtype):
        raise ValueError(f"{op}: beta must match gamma ({gamma.dtype} {list(gamma.shape)}), got {beta.dtype} "
                         f"{list(beta.shape)}")
    fmt, alg = fused_mx_args(op, dst_type, scale_alg, round_mode)
    if fmt == "fp4_e2m1" and x.shape[-1] % 2:
        raise ValueError(f"{op}: FP4 packs two values a byte, so K must be even, got {x.shape[-1]}")
    return fmt, alg


def rms_norm_fp32(x32: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, epsilon: float):
    """The kernels' norm of an fp32 tensor: (y fp32, rstd fp32 [..., 1])."""
    sum_sq = x32.double().square().sum(-1, keepdim=True).float()
    mean = sum_sq * torch.tensor(1.0 / x32.shape[-1], dtype=torch.float32)
    rstd = torch.rsqrt((mean + torch.tensor(epsilon, dtype=torch.float32)).double()).float()
    y = x32 * rstd * gamma.float()
    return (y if beta is None else y + beta.float()), rstd


def _norm_quant(x32, dtype, gamma, beta, epsilon, fmt, alg, round_mode):
    y, rstd = rms_norm_fp32(x32, gamma, beta, epsilon)
    q, scale = mx_quantized(y.to(dtype), fmt, alg, round_mode)
    return q, scale, rstd


@torch.library.register_kernel("mxfx::npu_rms_norm_dynamic_mx_quant", ("cpu", "cuda"))
def _rms_norm_dynamic_mx_quant(x, gamma, *, beta=None, epsilon=1e-6, scale_alg=0, round_mode="rint", dst_type=296):
    fmt, alg = _check("npu_rms_norm_dynamic_mx_quant", x, gamma, beta, dst_type, scale_alg, round_mode)
    return _norm_quant(x.float(), x.dtype, gamma, beta, epsilon, fmt, alg, round_mode)


@torch.library.register_fake("mxfx::npu_rms_norm_dynamic_mx_quant")
def _rms_norm_dynamic_mx_quant_fake(x, gamma, *, beta=None, epsilon=1e-6, scale_alg=0, round_mode="rint",
                                    dst_type=296):
    fmt, _ = _check("npu_rms_norm_dynamic_mx_quant", x, gamma, beta, dst_type, scale_alg, round_mode)
    q, scale = mx_quantized_fake(x, fmt)
    return q, scale, x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _check_add(x1, x2):
    if x1.shape != x2.shape or x1.dtype != x2.dtype:
        raise ValueError(f"npu_add_rms_norm_dynamic_mx_quant: x1 and x2 must have one shape and dtype, got "
                         f"{x1.dtype} {list(x1.shape)} and {x2.dtype} {list(x2.shape)}")


@torch.library.register_kernel("mxfx::npu_add_rms_norm_dynamic_mx_quant", ("cpu", "cuda"))
def _add_rms_norm_dynamic_mx_quant(x1, x2, gamma, *, beta=None, epsilon=1e-6, scale_alg=0, round_mode="rint",
                                   dst_type=296):
    _check_add(x1, x2)
    fmt, alg = _check("npu_add_rms_norm_dynamic_mx_quant", x1, gamma, beta, dst_type, scale_alg, round_mode)
    x32 = x1.float() + x2.float()
    q, scale, rstd = _norm_quant(x32, x1.dtype, gamma, beta, epsilon, fmt, alg, round_mode)
    return q, x32.to(x1.dtype), scale, rstd


@torch.library.register_fake("mxfx::npu_add_rms_norm_dynamic_mx_quant")
def _add_rms_norm_dynamic_mx_quant_fake(x1, x2, gamma, *, beta=None, epsilon=1e-6, scale_alg=0, round_mode="rint",
                                        dst_type=296):
    _check_add(x1, x2)
    y, scale, rstd = _rms_norm_dynamic_mx_quant_fake(x1, gamma, beta=beta, epsilon=epsilon, scale_alg=scale_alg,
                                                     round_mode=round_mode, dst_type=dst_type)
    return y, torch.empty_like(x1), scale, rstd

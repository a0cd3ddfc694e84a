"""Independent numpy oracle for the fused norm / SwiGLU + MX quantizers, written from the ops-nn goldens and
A5 kernels (norm/add_rms_norm_dynamic_mx_quant, norm/rms_norm_dynamic_mx_quant, quant/swiglu_mx_quant), not
from mxfx's code; the MX step is tests/formats/golden.py's quantizer oracle. Inputs and outputs are numpy
arrays: float32 values (bf16/fp16 values held in float32), element values on the grid and scale bytes.
"""

import numpy as np

from tests.formats.golden import mx_quantize_golden, round_to_input_dtype


def rms_norm_golden(x32, gamma32, beta32, eps):
    """fp32 (y, rstd): sum of squares rounded once to fp32, mean by fp32(1/K), rstd = fp32(1/sqrt(mean + eps)),
    y = (x * rstd) * gamma (+ beta), every product in fp32."""
    x32 = np.asarray(x32, dtype=np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        sum_sq = np.sum(x32.astype(np.float64) ** 2, axis=-1, keepdims=True).astype(np.float32)
        mean = sum_sq * np.float32(1.0 / x32.shape[-1])
        rstd = (1.0 / np.sqrt((mean + np.float32(eps)).astype(np.float64))).astype(np.float32)
        y = (x32 * rstd) * np.asarray(gamma32, dtype=np.float32)
    if beta32 is not None:
        y = y + np.asarray(beta32, dtype=np.float32)
    return y, rstd


def norm_quant_golden(x32, gamma32, eps, fmt, scale_alg="floor", round_mode="rint", dtype="bf16", beta32=None,
                      residual32=None):
    """(values, scale bytes [..., ceil(K/32)], x_out or None, rstd) of the fused norm: x = x + residual in
    fp32 (the add variant), normed in fp32, cast once to the input dtype, MX-quantized."""
    x = np.asarray(x32, dtype=np.float32)
    x_out = None
    if residual32 is not None:
        x = x + np.asarray(residual32, dtype=np.float32)
        x_out = round_to_input_dtype(x, dtype)
    y, rstd = rms_norm_golden(x, gamma32, beta32, eps)
    values, scale = mx_quantize_golden(round_to_input_dtype(y, dtype), fmt, 32, scale_alg, round_mode, dtype)
    return values, scale, x_out, rstd


def swiglu_golden(x32, activate_left):
    """SwiGLU mode 0 in fp32: the gate is the first half when activate_left, else the second;
    gate / (1 + exp(-gate)) * other (exp rounded once to fp32)."""
    x = np.asarray(x32, dtype=np.float32)
    first, second = np.split(x, 2, axis=-1)
    gate, other = (first, second) if activate_left else (second, first)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-gate.astype(np.float64)).astype(np.float32)
        return gate / (e + np.float32(1.0)) * other


def swiglu_quant_golden(x32, activate_left, fmt, scale_alg="floor", round_mode="rint", dtype="bf16"):
    """(values, scale bytes): swiglu_golden cast to the input dtype, MX-quantized."""
    out = swiglu_golden(x32, activate_left)
    return mx_quantize_golden(round_to_input_dtype(out, dtype), fmt, 32, scale_alg, round_mode, dtype)

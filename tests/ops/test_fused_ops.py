"""The fused norm / SwiGLU + MX ops against the numpy oracle (tests/ops/fused_golden.py), bit for bit on
codes, scales, x_out and rstd, with edge cases (zero, inf, NaN, subnormal and huge rows, ragged K, eps and
gamma dtype variants), and opcheck (schema, fake kernel, dispatch)."""

import numpy as np
import pytest
import torch

import mxfx.ops  # noqa: F401  (registers torch.ops.mxfx)
from mxfx.formats import from_paired_scales
from tests.formats.golden import decode_fp4_packed
from tests.ops.fused_golden import norm_quant_golden, swiglu_quant_golden

ops = torch.ops.mxfx
DST = {"fp8_e4m3": 292, "fp4_e2m1": 296}
ALG = {"floor": 0, "rceil": 1}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _rows(m, k, dtype, seed):
    """Random rows spread over 2**-20..2**20, then the edge rows: zeros, an inf, a NaN, subnormal values
    (bf16 only: fp16 has no subnormals this small), huge values (x**2 overflows fp32), a row with one
    dominant element."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-20, 21, (m, 1), generator=g).float())
    x[0] = 0
    x[1, 3] = float("inf")
    x[2, k - 1] = float("nan")
    x[3] = torch.randn(k, generator=g) * (1e-40 if dtype == torch.bfloat16 else 1e-6)
    x[4] = torch.randn(k, generator=g) * (1e30 if dtype == torch.bfloat16 else 3e4)
    x[5, 7] = 1e4
    return x.to(dtype)


def _values(q, fmt):
    return decode_fp4_packed(q.numpy()) if fmt == "fp4_e2m1" else q.float().numpy()


def _assert_quantized(q, scale, fmt, k, exp_values, exp_bytes):
    np.testing.assert_array_equal(_values(q, fmt), exp_values)
    np.testing.assert_array_equal(from_paired_scales(scale, -(-k // 32)).view(torch.uint8).numpy(), exp_bytes)


NORM_CASES = [  # fmt, scale_alg, round_mode, dtype, K, eps, gamma fp32, beta
    ("fp8_e4m3", "floor", "rint", "bf16", 512, 1e-6, False, False),
    ("fp8_e4m3", "rceil", "rint", "bf16", 96, 1e-5, True, False),
    ("fp8_e4m3", "floor", "rint", "fp16", 80, 0.1, False, True),
    ("fp4_e2m1", "floor", "rint", "bf16", 512, 1e-6, True, True),
    ("fp4_e2m1", "floor", "round", "bf16", 96, 1e-6, False, False),
    ("fp4_e2m1", "floor", "floor", "fp16", 160, 1e-5, True, False),
]


@pytest.mark.parametrize("fmt, alg, round_mode, dtype, k, eps, gamma_fp32, beta", NORM_CASES)
@pytest.mark.parametrize("add", [False, True])
def test_norm_quant_matches_oracle(fmt, alg, round_mode, dtype, k, eps, gamma_fp32, beta, add):
    torch_dtype = DTYPES[dtype]
    x = _rows(12, k, torch_dtype, seed=k)
    residual = _rows(12, k, torch_dtype, seed=k + 1).roll(1, 0)  # edge rows meet ordinary ones
    gamma = torch.randn(k, generator=torch.Generator().manual_seed(7)) * 2
    gamma = gamma.to(torch.float32 if gamma_fp32 else torch_dtype)
    beta_t = torch.randn(k, generator=torch.Generator().manual_seed(8)).to(gamma.dtype) if beta else None
    kwargs = {"beta": beta_t, "epsilon": eps, "scale_alg": ALG[alg], "round_mode": round_mode, "dst_type": DST[fmt]}
    if add:
        q, x_out, scale, rstd = ops.npu_add_rms_norm_dynamic_mx_quant(x, residual, gamma, **kwargs)
    else:
        q, scale, rstd = ops.npu_rms_norm_dynamic_mx_quant(x, gamma, **kwargs)
    values, bytes_, exp_x_out, exp_rstd = norm_quant_golden(
        x.float().numpy(), gamma.float().numpy(), eps, fmt, alg, round_mode, dtype,
        beta_t.float().numpy() if beta else None, residual.float().numpy() if add else None)
    _assert_quantized(q, scale, fmt, k, values, bytes_)
    np.testing.assert_array_equal(rstd.numpy(), exp_rstd)
    if add:
        np.testing.assert_array_equal(x_out.float().numpy(), exp_x_out)
        unfused = (x + residual).view(torch.int16)  # the residual add an unfused graph computes
        assert torch.equal(x_out.view(torch.int16), unfused)


def test_norm_edge_rows_follow_the_documented_boundaries():
    """aclnnRmsNormDynamicMxQuant: an inf input gives rstd 0 and a 0xFF scale for its block, a NaN gives
    rstd NaN and 0xFF scales; an all-zero row gives zeros with scale byte 0; squares that overflow fp32
    (|x| ~ 1e30) give rstd 0, as fp32 squares on the device do."""
    x = _rows(6, 64, torch.bfloat16, seed=1)
    q, scale, rstd = ops.npu_rms_norm_dynamic_mx_quant(x, torch.ones(64, dtype=torch.bfloat16), dst_type=292)
    assert rstd[1].item() == 0 and rstd[2].isnan().all() and rstd[4].item() == 0
    assert scale[1, 0, 0] == 0xFF and (scale[2, :, :] == 0xFF).all() and (scale[0] == 0).all()
    assert (q[[0, 1, 2]].float() == 0).all()


def test_gamma_multiplies_in_fp32_and_casts_once():
    """The fused op is not transformers' Qwen3RMSNorm (cast to bf16, then weight * in bf16): some rows must
    differ, and the fused y must be the single-rounding one."""
    x = _rows(64, 512, torch.bfloat16, seed=3)[6:]
    gamma = torch.randn(512, generator=torch.Generator().manual_seed(4)).bfloat16()
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    eager = gamma * normed.bfloat16()  # Qwen3RMSNorm
    q, scale, _ = ops.npu_rms_norm_dynamic_mx_quant(x, gamma, dst_type=292)
    eager_q, eager_scale = ops.npu_dynamic_mx_quant(eager, dst_type=292)
    assert not torch.equal(q.view(torch.uint8), eager_q.view(torch.uint8))
    once = ops.npu_dynamic_mx_quant((normed * gamma.float()).bfloat16(), dst_type=292)
    assert (q.view(torch.uint8) == once[0].view(torch.uint8)).float().mean() > 0.999


SWIGLU_CASES = [("fp8_e4m3", "floor", "rint", "bf16", 1024), ("fp8_e4m3", "rceil", "rint", "fp16", 192),
                ("fp4_e2m1", "floor", "rint", "bf16", 128), ("fp4_e2m1", "floor", "round", "bf16", 3072),
                ("fp4_e2m1", "floor", "floor", "fp16", 160)]


@pytest.mark.parametrize("fmt, alg, round_mode, dtype, d", SWIGLU_CASES)
@pytest.mark.parametrize("activate_left", [True, False])
def test_swiglu_quant_matches_oracle(fmt, alg, round_mode, dtype, d, activate_left):
    x = _rows(12, d, DTYPES[dtype], seed=d)
    x[6, : d // 2] = -200.0  # exp(-gate) overflows fp32: silu -> -0
    q, scale = ops.npu_swiglu_mx_quant(x, activate_left=activate_left, dst_type=DST[fmt], scale_alg=ALG[alg],
                                       round_mode=round_mode)
    values, bytes_ = swiglu_quant_golden(x.float().numpy(), activate_left, fmt, alg, round_mode, dtype)
    _assert_quantized(q, scale, fmt, d // 2, values, bytes_)


def test_swiglu_halves_order():
    """activate_left=True is silu(first half) * second half, as npu_swiglu and transformers' MLP
    (silu(gate) * up on cat([gate, up])) compute it; the default False activates the second half."""
    gate, up = torch.full((2, 64), 1.0), torch.full((2, 64), 4.0)
    x = torch.cat([gate, up], -1).bfloat16()
    left = ops.npu_swiglu_mx_quant(x, activate_left=True, dst_type=292)
    right = ops.npu_swiglu_mx_quant(x, dst_type=292)
    for (q, scale), expected in ((left, torch.nn.functional.silu(gate) * up),
                                 (right, torch.nn.functional.silu(up) * gate)):
        ref = ops.npu_dynamic_mx_quant(expected.bfloat16(), dst_type=292)
        assert torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(scale, ref[1])
    assert not torch.equal(left[0].view(torch.uint8), right[0].view(torch.uint8))


@pytest.mark.parametrize("dst_type", [292, 296])
def test_fused_ops_opcheck_and_meta_shapes(dst_type):
    x, gamma = torch.randn(2, 3, 96).bfloat16(), torch.randn(96).bfloat16()
    y, scale, rstd = ops.npu_rms_norm_dynamic_mx_quant(x, gamma, dst_type=dst_type)
    assert y.shape == ((2, 3, 96) if dst_type == 292 else (2, 3, 48)) and scale.shape == (2, 3, 2, 2)
    assert rstd.shape == (2, 3, 1) and rstd.dtype == torch.float32
    torch.library.opcheck(ops.npu_rms_norm_dynamic_mx_quant.default, (x, gamma),
                          {"dst_type": dst_type, "epsilon": 1e-5})
    torch.library.opcheck(ops.npu_add_rms_norm_dynamic_mx_quant.default, (x, x, gamma),
                          {"dst_type": dst_type, "beta": gamma})
    y, scale = ops.npu_swiglu_mx_quant(x, dst_type=dst_type)
    assert y.shape == ((2, 3, 48) if dst_type == 292 else (2, 3, 24)) and scale.shape == (2, 3, 1, 2)
    torch.library.opcheck(ops.npu_swiglu_mx_quant.default, (x,), {"dst_type": dst_type, "activate_left": True})


@pytest.mark.parametrize(
    "call, match",
    [(lambda x, g: ops.npu_rms_norm_dynamic_mx_quant(x, g, scale_alg=2), "scale_alg must be 0 or 1"),
     (lambda x, g: ops.npu_rms_norm_dynamic_mx_quant(x, g, scale_alg=1), "rceil"),
     (lambda x, g: ops.npu_rms_norm_dynamic_mx_quant(x, g, dst_type=292, round_mode="floor"), "rint"),
     (lambda x, g: ops.npu_rms_norm_dynamic_mx_quant(x, g[:32]), "gamma"),
     (lambda x, g: ops.npu_rms_norm_dynamic_mx_quant(x.float(), g), "bf16/fp16"),
     (lambda x, g: ops.npu_add_rms_norm_dynamic_mx_quant(x, x[:1], g), "one shape"),
     (lambda x, g: ops.npu_rms_norm_dynamic_mx_quant(x, g, dst_type=291), "float8_e5m2"),
     (lambda x, g: ops.npu_swiglu_mx_quant(x, swiglu_mode=1), "swiglu_mode"),
     (lambda x, g: ops.npu_swiglu_mx_quant(x, group_index=torch.tensor([2])), "group_index"),
     (lambda x, g: ops.npu_swiglu_mx_quant(x, activate_dim=0), "activate_dim"),
     (lambda x, g: ops.npu_swiglu_mx_quant(torch.ones(4, 66, dtype=x.dtype)), "multiple of 4")],
)
def test_fused_ops_refuse_what_they_do_not_emulate(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 64).bfloat16(), torch.ones(64).bfloat16())

"""The mxfx ops: torch.library.opcheck (schema, fake kernel, dispatch), torch_npu's output shapes, and
the matmuls against the ops-nn golden (loops over level-0 / level-1 groups in numpy)."""

import numpy as np
import pytest
import torch

import mxfx.ops  # noqa: F401  (registers torch.ops.mxfx)
from mxfx.formats import dequantize_mx, e2m1_decode, from_paired_scales, nz_to_nd, unpack_fp4

ops = torch.ops.mxfx
E8M0 = 293


def _randn(*shape, seed=0, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("k", [512, 1024, 96])
def test_dual_level_quant_shapes_and_opcheck(k):
    x = _randn(3, 5, k)
    q, level0, level1 = ops.npu_dynamic_dual_level_mx_quant(x)
    assert (q.dtype, q.shape) == (torch.uint8, (3, 5, k // 2))
    assert (level0.dtype, level0.shape) == (torch.float32, (3, 5, -(-k // 512)))
    assert (level1.dtype, level1.shape) == (torch.uint8, (3, 5, -(-k // 64), 2))
    torch.library.opcheck(ops.npu_dynamic_dual_level_mx_quant.default, (x,))


def test_dual_level_quant_known_answer():
    q, level0, level1 = ops.npu_dynamic_dual_level_mx_quant(torch.full((1, 512), 8.0, dtype=torch.bfloat16))
    assert (q == 119).all() and level0.item() == np.float32(8 * np.float32(1 / 6)) and (level1 == 127).all()


def test_smooth_scale_multiplies_in_the_input_dtype():
    x, smooth = _randn(2, 512), _randn(512, seed=1).float()
    got = ops.npu_dynamic_dual_level_mx_quant(x, smooth_scale=smooth)
    expected = ops.npu_dynamic_dual_level_mx_quant(x * smooth.bfloat16())
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("dst_type, k", [(292, 64), (296, 64), (292, 96), (296, 160)])
def test_mx_quant_shapes_and_opcheck(dst_type, k):
    x = _randn(4, k)
    y, scale = ops.npu_dynamic_mx_quant(x, dst_type=dst_type)
    assert y.shape == ((4, k) if dst_type == 292 else (4, k // 2))
    assert y.dtype == (torch.float8_e4m3fn if dst_type == 292 else torch.uint8)
    assert (scale.dtype, scale.shape) == (torch.uint8, (4, -(-k // 64), 2))
    if k % 64:
        assert (scale[:, -1, 1] == 0).all(), "odd block count: the pair is padded with byte 0"
    torch.library.opcheck(ops.npu_dynamic_mx_quant.default, (x,), {"dst_type": dst_type})


@pytest.mark.parametrize(
    "kwargs, match",
    [({"axis": 0}, "last axis"), ({"dst_type": 291}, "dst_type"), ({"scale_alg": 2}, "scale_alg"),
     ({"dst_type_max": 1.0}, "dst_type_max")],
)
def test_mx_quant_refuses_what_it_does_not_emulate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.npu_dynamic_mx_quant(_randn(4, 64), **kwargs)


def test_format_cast_is_emulated_nz():
    w = torch.randint(-128, 127, (48, 64), dtype=torch.int8)
    nz = ops.npu_format_cast(w, 29)
    assert nz.shape == (2, 3, 16, 32) and torch.equal(nz_to_nd(nz, 48, 64), w)
    torch.library.opcheck(ops.npu_format_cast.default, (w, 29))
    with pytest.raises(ValueError, match="FRACTAL_NZ"):
        ops.npu_format_cast(w, 2)


def _golden_dual_level_matmul(x1, x2, x1_l0, x2_l0, x1_l1, x2_l1, bias):
    """ops-nn dual_level_quant_batch_matmul golden: loops over level-0 and level-1 groups, fp32."""
    a = e2m1_decode(unpack_fp4(x1)).numpy()
    b = e2m1_decode(unpack_fp4(x2)).numpy().T  # [K, N]
    s1a = from_paired_scales(torch.from_numpy(x1_l1), a.shape[1] // 32).view(torch.uint8).numpy()
    s1b = from_paired_scales(torch.from_numpy(x2_l1), a.shape[1] // 32).view(torch.uint8).numpy()
    e8m0 = lambda u: (2.0 ** (u.astype(np.float64) - 127)).astype(np.float32)  # noqa: E731
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for g0 in range(a.shape[1] // 512):
        acc_l0 = np.zeros_like(acc)
        for g1 in range(g0 * 16, g0 * 16 + 16):
            k0 = g1 * 32
            partial = a[:, k0:k0 + 32] @ b[k0:k0 + 32, :]
            acc_l0 += partial * e8m0(s1a[:, g1])[:, None] * e8m0(s1b[:, g1])[None, :]
        acc += x1_l0[:, g0][:, None] * x2_l0[g0, :][None, :] * acc_l0
    return acc + bias


def test_dual_level_matmul_matches_golden_and_opcheck():
    m, k, n = 8, 1024, 48
    qa, la0, la1 = ops.npu_dynamic_dual_level_mx_quant(_randn(m, k))
    qw, lw0, lw1 = ops.npu_dynamic_dual_level_mx_quant(_randn(n, k, seed=1))
    bias = _randn(n, seed=2).float()
    args = (qa, ops.npu_format_cast(qw.view(torch.int8), 29), la0, lw0.t().contiguous(), la1, lw1)
    got = ops.npu_dual_level_quant_matmul(*args, bias=bias, output_dtype=6)
    expected = _golden_dual_level_matmul(qa, qw, la0.numpy(), lw0.t().numpy(), la1.numpy(), lw1.numpy(), bias.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    bf16 = ops.npu_dual_level_quant_matmul(*args, bias=bias, output_dtype=15)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, got.bfloat16()), "one cast, at the end"
    torch.library.opcheck(ops.npu_dual_level_quant_matmul.default, args, {"bias": bias, "output_dtype": 15})


def test_dual_level_matmul_checks_shapes():
    qa, la0, la1 = ops.npu_dynamic_dual_level_mx_quant(_randn(2, 512))
    qw, lw0, lw1 = ops.npu_dynamic_dual_level_mx_quant(_randn(32, 512))
    with pytest.raises(ValueError, match="x2_level0_scale"):
        ops.npu_dual_level_quant_matmul(qa, ops.npu_format_cast(qw.view(torch.int8), 29), la0, lw0, la1, lw1)
    with pytest.raises(ValueError, match="emulated FRACTAL_NZ"):
        ops.npu_dual_level_quant_matmul(qa, qw.view(torch.int8), la0, lw0.t().contiguous(), la1, lw1)


def _mx_args(weight_dst_type):
    m, k, n = 6, 96, 40
    qa, sa = ops.npu_dynamic_mx_quant(_randn(m, k), dst_type=292)
    qw, sw = ops.npu_dynamic_mx_quant(_randn(n, k, seed=1), dst_type=weight_dst_type)
    kwargs = {"pertoken_scale": sa, "scale_dtype": E8M0, "pertoken_scale_dtype": E8M0, "output_dtype": 6,
              "group_sizes": [1, 1, 32] if weight_dst_type == 292 else [0, 0, 32],
              "x2_dtype": None if weight_dst_type == 292 else 296}
    return (qa, qw.t(), sw.transpose(0, 1)), kwargs, (qa, sa, qw, sw)


@pytest.mark.parametrize("weight_dst_type, fmt", [(292, "fp8_e4m3"), (296, "fp4_e2m1")])
def test_quant_matmul_mx_modes_match_golden_and_opcheck(weight_dst_type, fmt):
    args, kwargs, (qa, sa, qw, sw) = _mx_args(weight_dst_type)
    bias = _randn(40, seed=3).float()
    got = ops.npu_quant_matmul(*args, bias=bias, **kwargs)
    # aclnnQuantMatmulV5 MX formula: sum over 32-groups of (x1 slice . x2 slice) * x1Scale * x2Scale, fp32
    a = dequantize_mx(qa, from_paired_scales(sa, 3), "fp8_e4m3").numpy()
    b = dequantize_mx(qw, from_paired_scales(sw, 3), fmt).numpy()
    np.testing.assert_allclose(got.numpy(), a @ b.T + bias.numpy(), rtol=1e-5, atol=1e-5)
    # test_schema compares inputs before and after the call with arithmetic torch lacks for float8
    torch.library.opcheck(ops.npu_quant_matmul.default, args, kwargs,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize(
    "change, match",
    [({"group_sizes": [1, 1, 64]}, "group_sizes"), ({"scale_dtype": None}, "293"),
     ({"output_dtype": None}, "output_dtype"), ({"output_dtype": 3}, "output_dtype")],
)
def test_quant_matmul_refuses_other_modes(change, match):
    args, kwargs, _ = _mx_args(292)
    with pytest.raises(ValueError, match=match):
        ops.npu_quant_matmul(*args, **{**kwargs, **change})


def test_decoded_weight_cache_follows_the_weight_constant():
    import gc

    from mxfx.ops.matmul import DECODED_WEIGHTS

    args, kwargs, _ = _mx_args(292)
    before = set(DECODED_WEIGHTS._entries)
    first = ops.npu_quant_matmul(*args, **kwargs)
    mine = set(DECODED_WEIGHTS._entries) - before
    assert len(mine) == 1
    assert torch.equal(ops.npu_quant_matmul(*args, **kwargs), first) and set(DECODED_WEIGHTS._entries) - before == mine
    args[1].view(torch.uint8).bitwise_xor_(1)  # an in-place change bumps the version: decoded again
    assert not torch.equal(ops.npu_quant_matmul(*args, **kwargs), first)
    replaced = set(DECODED_WEIGHTS._entries) - before
    assert len(replaced) == 1 and replaced != mine, "the new version's entry replaces the old one"
    mine = replaced
    del args, kwargs
    gc.collect()
    assert not mine & set(DECODED_WEIGHTS._entries), "entries go with their weight constants"

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
    [({"axis": 0}, "last axis"), ({"dst_type": 291}, "float8_e5m2 is not emulated"),
     ({"dst_type": 297}, "float4_e1m2fn_x2 is not emulated"), ({"dst_type": 290}, "hifloat8 is not emulated"),
     ({"dst_type": torch.float4_e2m1fn_x2}, "pass torch_npu's 296"), ({"dst_type": 7}, "dst_type=7"),
     ({"scale_alg": 3}, "scale_alg"), ({"scale_alg": 2, "dst_type": 292}, "FP4 E2M1"),
     ({"scale_alg": 2, "dst_type_max": 1.0}, "dst_type_max"), ({"dst_type_max": 7.0}, "dst_type_max"),
     ({"max_low_bound": 1.0}, "max_low_bound")],
)
def test_mx_quant_refuses_what_it_does_not_emulate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.npu_dynamic_mx_quant(_randn(4, 64), **kwargs)


@pytest.mark.parametrize("kwargs", [{"scale_alg": 2, "dst_type_max": 7.25}, {"scale_alg": 2, "dst_type_max": 6.0},
                                    {"scale_alg": 1, "max_low_bound": 1e-3, "dst_type": torch.float8_e4m3fn},
                                    {"round_mode": "round"}, {"scale_alg": None}])
def test_mx_quant_scale_rules_reach_formats_and_opcheck(kwargs):
    from mxfx.formats import quantize_mx, to_paired_scales

    x = _randn(4, 64)
    y, scale = ops.npu_dynamic_mx_quant(x, **kwargs)
    fmt = "fp8_e4m3" if "dst_type" in kwargs else "fp4_e2m1"
    algs = {None: "floor", 0: "floor", 1: "rceil", 2: "dyn_range"}
    q, s = quantize_mx(x, fmt, 32, algs[kwargs.get("scale_alg", 0)], kwargs.get("round_mode", "rint"),
                       kwargs.get("dst_type_max", 0.0), kwargs.get("max_low_bound", 0.0))
    assert torch.equal(y.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale, to_paired_scales(s))
    torch.library.opcheck(ops.npu_dynamic_mx_quant.default, (x,), kwargs)


def test_dtype_codes_are_what_torch_passes_for_a_dtype():
    """A torch.dtype given to an `int` schema argument arrives as its c10::ScalarType number; the table
    dtypes.C10_CODES must hold exactly those numbers."""
    from mxfx.ops.dtypes import C10_CODES, C10_FLOAT4_E2M1FN_X2

    lib = torch.library.Library("mxfx_dtype_probe", "FRAGMENT")
    lib.define("echo(int code) -> Tensor")
    lib.impl("echo", lambda code: torch.tensor(code), "CompositeExplicitAutograd")
    echo = torch.ops.mxfx_dtype_probe.echo
    for name, code in C10_CODES.items():
        assert echo(getattr(torch, name)).item() == code, name
    assert echo(torch.float4_e2m1fn_x2).item() == C10_FLOAT4_E2M1FN_X2


@pytest.mark.parametrize("spelling", [torch.float8_e4m3fn, 24, 292])
def test_mx_quant_dst_type_spellings(spelling):
    x = _randn(4, 64)
    y, scale = ops.npu_dynamic_mx_quant(x, dst_type=spelling)
    ref_y, ref_scale = ops.npu_dynamic_mx_quant(x, dst_type=292)
    assert y.dtype == torch.float8_e4m3fn and torch.equal(y.view(torch.uint8), ref_y.view(torch.uint8))
    assert torch.equal(scale, ref_scale)
    torch.library.opcheck(ops.npu_dynamic_mx_quant.default, (x,), {"dst_type": spelling})


def _nz_oracle_fp4(w_bytes: np.ndarray) -> np.ndarray:
    """FRACTAL_NZ of packed FP4 [N, K/2] with C0 = 32 FP4 elements, written on the elements (numpy only):
    nz[c1, r1, r0, i] = E[16 r1 + r0, 32 c1 + i], zero padded, then repacked two per byte (low nibble first)."""
    e = np.stack([w_bytes & 0xF, w_bytes >> 4], axis=-1).reshape(w_bytes.shape[0], -1)
    n, k = e.shape
    r1, c1 = -(-n // 16), -(-k // 32)
    padded = np.zeros((r1 * 16, c1 * 32), np.uint8)
    padded[:n, :k] = e
    nz = padded.reshape(r1, 16, c1, 32).transpose(2, 0, 1, 3)
    return (nz[..., 0::2] | (nz[..., 1::2] << 4)).astype(np.uint8)


@pytest.mark.parametrize("n, k", [(48, 64), (40, 96), (17, 32)])
def test_format_cast_fp4_weight_layout(n, k):
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    nz = ops.npu_format_cast(w, 29, customize_dtype=torch.float8_e4m3fn, input_dtype=296)
    assert nz.shape == (-(-k // 32), -(-n // 16), 16, 16) and nz.dtype == torch.uint8
    np.testing.assert_array_equal(nz.numpy(), _nz_oracle_fp4(w.numpy()))
    for customize in (torch.float8_e4m3fn, 24, 292):
        torch.library.opcheck(ops.npu_format_cast.default, (w, 29), {"customize_dtype": customize, "input_dtype": 296})


@pytest.mark.parametrize("customize", [torch.int8, 1, 258])
def test_format_cast_customize_dtype_equal_to_own_is_plain_nz(customize):
    w = torch.randint(-128, 127, (48, 64), dtype=torch.int8)
    assert torch.equal(ops.npu_format_cast(w, 29, customize_dtype=customize), ops.npu_format_cast(w, 29))
    torch.library.opcheck(ops.npu_format_cast.default, (w, 29), {"customize_dtype": customize})


@pytest.mark.parametrize(
    "kwargs, match",
    [({"customize_dtype": torch.bfloat16}, "customize_dtype"), ({"input_dtype": 296}, "customize_dtype"),
     ({"input_dtype": 292, "customize_dtype": 292}, "input_dtype"),
     ({"input_dtype": torch.float4_e2m1fn_x2, "customize_dtype": 292}, "296")],
)
def test_format_cast_refuses_other_variants(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.npu_format_cast(torch.zeros(32, 32, dtype=torch.int8), 29, **kwargs)


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


def _decoded(q, s, fmt, k):
    return dequantize_mx(q, from_paired_scales(s, -(-k // 32)), fmt).numpy()


@pytest.mark.parametrize("weight_dst_type", [292, 296])
@pytest.mark.parametrize("group_sizes", [None, [0, 0, 0], [1, 1, 32], [0, 0, 32]])
def test_quant_matmul_group_sizes_omitted_or_inferred(weight_dst_type, group_sizes):
    args, kwargs, _ = _mx_args(weight_dst_type)
    expected = ops.npu_quant_matmul(*args, **kwargs)
    kwargs = {**kwargs, "group_sizes": group_sizes}
    if group_sizes is None:
        del kwargs["group_sizes"]
    assert torch.equal(ops.npu_quant_matmul(*args, **kwargs), expected)
    torch.library.opcheck(ops.npu_quant_matmul.default, args, kwargs,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("spellings", [
    {"scale_dtype": torch.float8_e8m0fnu, "pertoken_scale_dtype": 44, "output_dtype": torch.float32},
    {"scale_dtype": 293, "pertoken_scale_dtype": torch.float8_e8m0fnu, "output_dtype": 256},
])
def test_quant_matmul_dtype_spellings(spellings):
    args, kwargs, _ = _mx_args(292)
    assert torch.equal(ops.npu_quant_matmul(*args, **{**kwargs, **spellings}), ops.npu_quant_matmul(*args, **kwargs))
    # omitted scale dtypes are read from e8m0 tensors, as torch_npu does
    e8m0 = {"pertoken_scale": kwargs["pertoken_scale"].view(torch.float8_e8m0fnu), "scale_dtype": None,
            "pertoken_scale_dtype": None}
    scale = args[2].view(torch.float8_e8m0fnu)
    assert torch.equal(ops.npu_quant_matmul(args[0], args[1], scale, **{**kwargs, **e8m0}),
                       ops.npu_quant_matmul(*args, **kwargs))
    for out, dtype in ((torch.bfloat16, torch.bfloat16), (283, torch.bfloat16),
                       (257, torch.float16), (5, torch.float16)):
        assert ops.npu_quant_matmul(*args, **{**kwargs, "output_dtype": out}).dtype == dtype


def _w4a4_args(m=5, k=128, n=24):
    """vllm-ascend W4A4_MXFP4: activation npu_dynamic_mx_quant(dst_type=FP4, round_mode='round'), weight
    [N, K/2] as .transpose(0, 1), its scale [N, K/64, 2] as .transpose(0, 1), x1_dtype = x2_dtype = FP4."""
    qa, sa = ops.npu_dynamic_mx_quant(_randn(m, k), dst_type=296, round_mode="round")
    qw, sw = ops.npu_dynamic_mx_quant(_randn(n, k, seed=1), dst_type=296)
    kwargs = {"pertoken_scale": sa, "scale_dtype": 293, "pertoken_scale_dtype": 293, "output_dtype": 15,
              "x1_dtype": 296, "x2_dtype": 296, "group_sizes": [1, 1, 32], "bias": _randn(n, seed=2).float()}
    return (qa, qw.transpose(0, 1), sw.transpose(0, 1)), kwargs, (qa, sa, qw, sw)


def test_quant_matmul_w4a4_fp4_activation_matches_golden_and_opcheck():
    args, kwargs, (qa, sa, qw, sw) = _w4a4_args()
    got = ops.npu_quant_matmul(*args, **{**kwargs, "output_dtype": 6})
    expected = _decoded(qa, sa, "fp4_e2m1", 128) @ _decoded(qw, sw, "fp4_e2m1", 128).T + kwargs["bias"].numpy()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # x1 as a torch.float4_e2m1fn_x2 tensor with x1_dtype omitted reads the same (torch_npu >= 2.8)
    fp4 = (qa.view(torch.float4_e2m1fn_x2),) + args[1:]
    assert torch.equal(ops.npu_quant_matmul(*fp4, **{**kwargs, "x1_dtype": None}),
                       ops.npu_quant_matmul(*args, **kwargs))
    torch.library.opcheck(ops.npu_quant_matmul.default, args, kwargs)


def test_quant_matmul_reads_the_nz_fp4_weight_in_the_orientation_of_its_view():
    """vllm-ascend W4A8_MXFP: npu_format_cast(w [N, K/2], 29, customize_dtype=float8_e4m3fn, input_dtype=FP4),
    then .transpose(-1, -2); vllm-ascend W4A4_MXFP4 with NZ on: the cast of w.t().contiguous() [K/2, N], as is.
    Both read as the ND weight (a cast passed as is is K-major, as the device reads it)."""
    args, kwargs, (_, _, qw, _) = _mx_args(296)
    nd = ops.npu_quant_matmul(*args, **kwargs)
    nz = ops.npu_format_cast(qw, 29, customize_dtype=torch.float8_e4m3fn, input_dtype=296)
    k_major = ops.npu_format_cast(qw.t().contiguous(), 29, customize_dtype=torch.float8_e4m3fn, input_dtype=296)
    assert not torch.equal(nz, k_major), "the two orientations are different bytes"
    for x2 in (nz.transpose(-1, -2), k_major):
        assert torch.equal(ops.npu_quant_matmul(args[0], x2, args[2], **kwargs), nd)
        torch.library.opcheck(ops.npu_quant_matmul.default, (args[0], x2, args[2]), kwargs,
                              test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize(
    "change, match",
    [({"group_sizes": [1, 1, 64]}, "group_sizes"), ({"group_sizes": [1, 32]}, "three elements"),
     ({"scale_dtype": None}, "scale_dtype omitted"), ({"scale_dtype": 15}, "scale_dtype=15"),
     ({"pertoken_scale_dtype": torch.float8_e8m0fnu, "scale_dtype": 294}, "scale_dtype=294"),
     ({"output_dtype": None}, "output_dtype"), ({"output_dtype": 3}, "output_dtype"),
     ({"x1_dtype": 296}, "x1_dtype says fp4_e2m1"), ({"x2_dtype": 291}, "float8_e5m2 is not emulated"),
     ({"x1_dtype": torch.float4_e2m1fn_x2}, "pass torch_npu's 296")],
)
def test_quant_matmul_refuses_other_modes(change, match):
    args, kwargs, _ = _mx_args(292)
    with pytest.raises(ValueError, match=match):
        ops.npu_quant_matmul(*args, **{**kwargs, **change})


def test_matmul_reads_the_weight_where_it_lies_at_each_call():
    """Nothing decoded is kept: an in-place change of the weight bytes shows in the next call, and the
    op holds no reference to its operands once it returns."""
    import gc
    import weakref

    args, kwargs, _ = _mx_args(292)
    first = ops.npu_quant_matmul(*args, **kwargs)
    args[1].view(torch.uint8).bitwise_xor_(1)
    assert not torch.equal(ops.npu_quant_matmul(*args, **kwargs), first)
    weight = weakref.ref(args[1])
    del args, kwargs
    gc.collect()
    assert weight() is None

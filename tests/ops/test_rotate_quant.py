"""mxfx::npu_rotate_quant against an independent numpy oracle written from the aclnnRotateQuant doc and the
A5 kernel (Y = x.reshape(*, K) @ rotation summed exactly, rounded once to bf16, optionally clamped per
32-group to bf16(max|Y| * alpha), then the MX quantizer golden of tests/formats/golden.py on bf16 values).

Inputs are small integers and rotations of 8-bit entries, so every fp32 sum is exact and the oracle's
float64 sums are the kernel's; the identity rotation plants zeros, ties, saturation, tiny and inf/NaN
blocks directly."""

import ml_dtypes
import numpy as np
import pytest
import torch

import mxfx.ops  # noqa: F401
from tests.formats.golden import decode_fp4_packed, mx_quantize_golden

mx = torch.ops.mxfx
FP4, E4M3 = 296, 292
FMT = {FP4: "fp4_e2m1", E4M3: "fp8_e4m3"}
ALG = {0: "floor", 1: "rceil", 2: "dyn_range"}


def _bf16(a):
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def golden(x, rotation, dst, scale_alg=0, round_mode="rint", dst_type_max=0.0, alpha=None):
    """(element values float32 [..., N], scale bytes uint8 [..., ceil(N/32)])."""
    x64, r64 = x.double().numpy(), rotation.double().numpy()
    n, k = x64.shape[-1], r64.shape[-1]
    r = np.broadcast_to(r64, (n // k, k, k)) if r64.ndim == 2 else r64
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in the cube
        y = np.einsum("...bi,bij->...bj", x64.reshape(*x64.shape[:-1], n // k, k), r).reshape(x64.shape)
    y = _bf16(y)  # exact in fp32 for these inputs: one rounding to bf16
    if alpha is not None and 0 < alpha < 1:
        groups = y.reshape(*y.shape[:-1], -1, 32)
        with np.errstate(invalid="ignore"):
            limit = _bf16(np.abs(groups).max(-1, keepdims=True) * alpha)
        y = np.clip(groups, -limit, limit).reshape(y.shape)
    return mx_quantize_golden(y, FMT[dst], 32, ALG[scale_alg], round_mode, "bf16", dst_type_max)


def check(x, rotation, dst, **kwargs):
    alpha = kwargs.pop("alpha", None)
    q, scale = mx.npu_rotate_quant(x, rotation, dst_dtype=dst, alpha=None if alpha is None else
                                   torch.tensor([alpha], dtype=torch.bfloat16), **kwargs)
    values, bytes_ = golden(x, rotation, dst, **kwargs, alpha=None if alpha is None else float(
        torch.tensor(alpha, dtype=torch.bfloat16)))
    n, groups = x.shape[-1], -(-x.shape[-1] // 32)
    assert scale.dtype == torch.float8_e8m0fnu and tuple(scale.shape) == (*x.shape[:-1], -(-groups // 2), 2)
    flat = scale.view(torch.uint8).reshape(*x.shape[:-1], -1).numpy()
    np.testing.assert_array_equal(flat[..., :groups], bytes_)
    assert (flat[..., groups:] == 0).all()  # the pair's padding byte
    if dst == FP4:
        assert q.dtype == torch.uint8 and tuple(q.shape) == (*x.shape[:-1], n // 2)
        got = decode_fp4_packed(q.numpy())
    else:
        assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
        got = q.float().numpy()
    np.testing.assert_array_equal(got, values)
    return q, scale


def integers(*shape, high=64, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-high, high + 1, shape, generator=g).to(dtype)


def rotation_of(k, blocks=None, seed=1, dtype=torch.bfloat16):
    """Entries i / 128 with |i| <= 127: exact in bf16 and fp16, products exact in fp32."""
    shape = (k, k) if blocks is None else (blocks, k, k)
    return (integers(*shape, high=127, seed=seed, dtype=torch.float32) / 128).to(dtype)


CASES = [(FP4, 0, "rint", 0.0), (FP4, 0, "round", 0.0), (FP4, 0, "floor", 0.0), (FP4, 2, "rint", 6.0),
         (FP4, 2, "round", 7.0), (FP4, 2, "rint", 7.25), (E4M3, 0, "rint", 0.0), (E4M3, 1, "rint", 0.0)]


@pytest.mark.parametrize("dst,scale_alg,round_mode,dst_type_max", CASES)
@pytest.mark.parametrize("k,blocks", [(32, None), (64, 3), (128, None)])
def test_matches_the_oracle(dst, scale_alg, round_mode, dst_type_max, k, blocks):
    n = 192 if k != 128 else 256  # N=192: 6 MX blocks (3 scale pairs); rotation blocks span 1, 2 or 4 of them
    x = integers(2, 3, n, seed=k)
    x[0, 0, :32] = 0  # an all-zero input block
    x[1, 2] *= 1000  # large: the bf16 rounding of Y matters
    rotation = rotation_of(k, None if blocks is None else n // k)
    check(x, rotation, dst, scale_alg=scale_alg, round_mode=round_mode, dst_type_max=dst_type_max)


def test_identity_rotation_edge_blocks():
    """Ties, saturation, tiny (flushed) blocks, zeros, inf and NaN, on block boundaries, 1-D x."""
    rows = {
        "ties": [0.25 * (2 * i + 1) for i in range(16)] + [4.0] * 16,  # halfway points of the FP4 grid
        "saturate": [7.5, -7.9, 6.5, 3.0] + [1.0] * 28,
        "tiny": [2.0**-130] * 32,
        "zeros": [0.0] * 32,
        "inf": [float("inf")] + [1.0] * 31,
        "nan": [float("nan")] + [1.0] * 31,
        "mixed_sign": [(-1) ** i * (i + 1) / 8 for i in range(32)],
    }
    x = torch.tensor(sum(rows.values(), []), dtype=torch.bfloat16)
    eye = torch.eye(32, dtype=torch.bfloat16)
    for round_mode in ("rint", "round", "floor"):
        check(x, eye, FP4, round_mode=round_mode)
    check(x, eye, E4M3)
    check(x, eye, E4M3, scale_alg=1)
    q, scale = check(x.reshape(7, 32), eye, FP4)
    assert scale.view(torch.uint8)[4, 0, 0] == 0xFF and scale.view(torch.uint8)[5, 0, 0] == 0xFF  # inf, NaN


def test_an_inf_poisons_its_whole_rotation_block():
    x = integers(1, 256, seed=3)
    x[0, 70] = float("inf")  # rotation block 1 of 64 (MX blocks 2 and 3)
    _, scale = check(x, rotation_of(64), FP4)
    nan_blocks = (scale.view(torch.uint8).reshape(-1) == 0xFF).nonzero().flatten().tolist()
    assert nan_blocks == [2, 3]


@pytest.mark.parametrize("alpha", [0.5, 0.3, 1e-3, 0.999])
@pytest.mark.parametrize("dst,scale_alg,dst_type_max", [(FP4, 0, 0.0), (FP4, 2, 7.25), (E4M3, 1, 0.0)])
def test_alpha_clamps_each_group_to_a_fraction_of_its_max(alpha, dst, scale_alg, dst_type_max):
    x = integers(4, 128, seed=5)
    check(x, rotation_of(32), dst, scale_alg=scale_alg, dst_type_max=dst_type_max, alpha=alpha)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 2.0, float("nan")])
def test_alpha_outside_0_1_clamps_nothing(alpha):
    x, rotation = integers(2, 64, seed=6), rotation_of(32)
    got = mx.npu_rotate_quant(x, rotation, dst_dtype=FP4, alpha=torch.tensor([alpha], dtype=torch.bfloat16))
    plain = mx.npu_rotate_quant(x, rotation, dst_dtype=FP4)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, plain))


def test_fp16_input_is_rotated_into_bf16_not_fp16():
    """The kernel's C type is bf16: Y = 1.0625 + 2**-9 is exact in fp16 but bf16 rounds it to the tie
    1.0625, which E4M3 (scale 1: the block max is 300) rounds to even 1.0; via fp16 it would be 1.125."""
    x = torch.zeros(1, 32, dtype=torch.float16)
    x[0, :3] = torch.tensor([1.0625, 2.0**-9, 300.0])
    rotation = torch.zeros(32, 32, dtype=torch.float16)
    rotation[0, 0] = rotation[1, 0] = rotation[2, 1] = 1.0
    q, _ = check(x, rotation, E4M3)
    via_fp16 = mx.npu_dynamic_mx_quant((x.float() @ rotation.float()).half(), dst_type=E4M3)[0]
    assert q[0, 0].item() == 1.0 and via_fp16[0, 0].item() == 1.125


def test_equals_the_rotation_then_npu_dynamic_mx_quant_on_bf16():
    """On bf16 x the op is the bf16 GEMM then the single-level quantizer (random data, random rotation)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(16, 512, generator=g) * torch.linspace(0.01, 30, 512)).bfloat16()
    rotation = torch.linalg.qr(torch.randn(4, 128, 128, generator=g))[0].bfloat16()
    for dst, mode in ((FP4, "round"), (E4M3, "rint")):
        q, s = mx.npu_rotate_quant(x, rotation, dst_dtype=dst, round_mode=mode)
        y = torch.einsum("mbi,bij->mbj", x.float().reshape(16, 4, 128), rotation.float()).reshape(16, 512).bfloat16()
        q2, s2 = mx.npu_dynamic_mx_quant(y, dst_type=dst, round_mode=mode)
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s.view(torch.uint8), s2)


def test_fake_kernel_and_schema():
    x, rotation = integers(2, 3, 128), rotation_of(64, 2)
    torch.library.opcheck(mx.npu_rotate_quant.default, (x, rotation), {"dst_dtype": FP4, "round_mode": "round"})
    torch.library.opcheck(mx.npu_rotate_quant.default, (x, rotation_of(32)), {"dst_dtype": E4M3, "scale_alg": 1})


@pytest.mark.parametrize("kwargs,rotation,match", [
    ({}, (32, 32), "dst_dtype=None is the Atlas A2/A3 per-token int"),
    ({"dst_dtype": 1}, (32, 32), "int8"),
    ({"dst_dtype": 16}, (32, 32), "quint4x2"),
    ({"dst_dtype": 291}, (32, 32), "float8_e5m2 is not emulated"),
    ({"dst_dtype": FP4}, (16, 16), r"K in \(32, 64, 128\)"),
    ({"dst_dtype": FP4}, (3, 32, 32), r"rotation must have shape \[4, 32, 32\]"),
    ({"dst_dtype": FP4}, (64, 32), r"rotation must have shape \[32, 32\]"),
    ({"dst_dtype": FP4, "scale_alg": 1}, (32, 32), "scale_alg must be one of"),
    ({"dst_dtype": E4M3, "scale_alg": 2, "dst_type_max": 6.0}, (32, 32), "scale_alg must be one of"),
    ({"dst_dtype": FP4, "scale_alg": 2}, (32, 32), "dst_type_max must be in"),
    ({"dst_dtype": FP4, "dst_type_max": 6.0}, (32, 32), "dst_type_max must be in"),
    ({"dst_dtype": E4M3, "round_mode": "round"}, (32, 32), "round_mode 'round' not allowed"),
    ({"dst_dtype": FP4, "round_mode": "ceil"}, (32, 32), "round_mode 'ceil'"),
    ({"dst_dtype": FP4, "axis": 0}, (32, 32), "axis must be -1 or 1"),
    ({"dst_dtype": FP4, "transpose_y": True}, (32, 32), "transpose_y"),
])
def test_bad_arguments_are_refused_by_name(kwargs, rotation, match):
    with pytest.raises(ValueError, match=match):
        mx.npu_rotate_quant(integers(2, 128), torch.zeros(rotation, dtype=torch.bfloat16), **kwargs)


def test_bad_tensors_are_refused_by_name():
    r = rotation_of(32)
    with pytest.raises(ValueError, match="must divide x's last dim N=96"):
        mx.npu_rotate_quant(integers(2, 96), rotation_of(64), dst_dtype=FP4)
    with pytest.raises(ValueError, match="rotation must have x's dtype"):
        mx.npu_rotate_quant(integers(2, 64), r.half(), dst_dtype=FP4)
    with pytest.raises(ValueError, match="non-empty 1-7-D bf16/fp16"):
        mx.npu_rotate_quant(integers(2, 64).float(), r.float(), dst_dtype=FP4)
    with pytest.raises(ValueError, match="alpha must be a bf16 tensor of shape"):
        mx.npu_rotate_quant(integers(2, 64), r, dst_dtype=FP4, alpha=torch.tensor([0.5]))

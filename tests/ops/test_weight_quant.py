"""mxfx::npu_weight_quant_batchmatmul and npu_convert_weight_to_int4pack against the ops-nn kernel golden
(wqbmmv2_kernel_golden.py, in numpy with ml_dtypes rounding), a hand-computed known answer, and opcheck."""

import ml_dtypes
import numpy as np
import pytest
import torch

import mxfx.ops  # noqa: F401  (registers torch.ops.mxfx)
from mxfx.ops.weight_quant import dequantized_weight

ops = torch.ops.mxfx
NP_DTYPES = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}


def _golden(x, weight, scale, offset, bias, group):
    """ops-nn wqbmmv2_kernel_golden: per group, Wdq = truncate(truncate(w + offset) * scale) in x's dtype;
    one fp32 matmul; the bias in fp32; the output in x's dtype. Returns (Wdq, fp32 result before the cast)."""
    inter = NP_DTYPES[x.dtype]
    truncate = lambda a: a.astype(inter).astype(np.float32)  # noqa: E731
    w, k = weight.numpy().astype(np.float32), weight.shape[0]
    s = scale.float().numpy().reshape(-1, w.shape[1])
    o = None if offset is None else offset.float().numpy().reshape(-1, w.shape[1])
    step = group or k
    for g, start in enumerate(range(0, k, step)):
        rows = slice(start, start + step)
        index = g if group else 0
        base = w[rows] if o is None else truncate(w[rows] + o[index : index + 1])
        w[rows] = truncate(base * s[index : index + 1])
    out = np.matmul(truncate(x.float().numpy()), w)
    if bias is not None:
        out = out + bias.float().numpy().reshape(-1)
    return w, out


def _case(dtype, k, n, group, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, k, generator=g).to(dtype)
    weight = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int8)
    rows = -(-k // group) if group else 1
    scale = (torch.rand(rows, n, generator=g) * 0.02 + 0.001).to(dtype)
    scale = scale if group else scale.reshape(n)
    off = (torch.randint(-2, 3, scale.shape, generator=g).float() * 0.5).to(dtype) if offset else None
    bias = torch.randn(n, generator=g).to(torch.float32 if dtype == torch.bfloat16 else torch.float16)
    return x, weight, scale, off, bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, group", [(256, 0), (256, 32), (512, 128), (320, 128)],
                         ids=["channel", "g32", "g128", "g128-tail"])
@pytest.mark.parametrize("offset", [False, True], ids=["sym", "offset"])
def test_matches_the_kernel_golden(dtype, k, group, offset):
    x, weight, scale, off, bias = _case(dtype, k, 48, group, offset)
    golden_w, golden = _golden(x, weight, scale, off, bias, group)
    wdq = dequantized_weight(weight.t(), scale.t(), None if off is None else off.t(), group, dtype)
    assert wdq.dtype == dtype and np.array_equal(wdq.t().float().numpy(), golden_w), "Wdq bit-exact"
    packed = ops.npu_convert_weight_to_int4pack(weight.to(torch.int32))
    for w in (weight, packed, weight.t().contiguous().t()):  # int8, int4 packed, int8 as a transposed view
        got = ops.npu_weight_quant_batchmatmul(x, w, scale, antiquant_offset=off, bias=bias, antiquant_group_size=group)
        assert got.dtype == dtype and got.shape == (5, 48)
        np.testing.assert_allclose(got.float().numpy(), golden.astype(NP_DTYPES[dtype]).astype(np.float32),
                                   rtol=2**-7, atol=1e-3)
    torch.library.opcheck(ops.npu_weight_quant_batchmatmul.default, (x, packed, scale),
                          {"antiquant_offset": off, "bias": bias, "antiquant_group_size": group})


def test_the_weight_is_rounded_to_the_activation_dtype_before_the_matmul():
    # w * scale = 3 * 1.703125 = 5.109375 rounds (tie, even) to 5.125 in bf16; 96 * 5.125 = 492 exactly,
    # while 96 * 5.109375 = 490.5 would round to 490
    x = torch.ones(1, 96, dtype=torch.bfloat16)
    weight, scale = torch.full((96, 8), 3, dtype=torch.int8), torch.full((8,), 1.703125, dtype=torch.bfloat16)
    assert ops.npu_weight_quant_batchmatmul(x, weight, scale).tolist() == [[492.0] * 8]


def test_int4pack_layout_and_opcheck():
    values = torch.randint(-8, 8, (64, 32), dtype=torch.int32)
    packed = ops.npu_convert_weight_to_int4pack(values)
    assert (packed.dtype, packed.shape) == (torch.int32, (64, 4))
    words = ops.npu_convert_weight_to_int4pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8, -1, 0, 0, 0, 0, 0, 0, -7]],
                                                            dtype=torch.int32))
    assert words.tolist() == [[np.uint32(0x87654321).view(np.int32), np.uint32(0x9000000F).view(np.int32)]]
    torch.library.opcheck(ops.npu_convert_weight_to_int4pack.default, (values,))
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.npu_convert_weight_to_int4pack(values[:, :12])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        ops.npu_convert_weight_to_int4pack(values + 8)


X, W, S = (torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(256, 16, dtype=torch.int8),
           torch.ones(16, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((X.float(), W, S), {}, "x must be 2-D"),
        ((X, W[:128], S), {}, "weight must be int8"),
        ((X, W, S.float()), {}, "antiquant_scale must be torch.bfloat16"),
        ((X, W, torch.ones(2, 16, dtype=torch.bfloat16)), {"antiquant_group_size": 64}, r"shape \[4, 16\]"),
        ((X, W, S), {"antiquant_group_size": 48}, "multiple of 32"),
        ((X, W, S), {"antiquant_group_size": 256}, r"\[32, K-1\]"),
        ((X, W, S), {"bias": torch.ones(16, dtype=torch.bfloat16)}, "bias must be torch.float32"),
        ((X, W, S), {"quant_scale": S}, "int8 output"),
        ((X, W, S), {"inner_precise": 1}, "only inner_precise=0"),
    ],
    ids=["x-dtype", "k", "scale-dtype", "group-shape", "group-32", "group-k", "bias-dtype", "quant-scale",
         "inner-precise"],
)
def test_refuses_what_it_does_not_emulate(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.npu_weight_quant_batchmatmul(*args, **kwargs)

"""torch_npu layouts: paired E8M0 scales and the FRACTAL_NZ permutation, against index-by-index oracles."""

import math

import pytest
import torch

from mxfx.formats import from_paired_scales, nd_to_nz, nz_to_nd, to_paired_scales


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 8, 9])
def test_paired_scales_pad_odd_counts_with_zero(num_blocks):
    scale = torch.arange(1, num_blocks + 1, dtype=torch.uint8).repeat(3, 1)  # [3, G], no zero bytes
    paired = to_paired_scales(scale)
    assert paired.dtype == torch.uint8 and paired.shape == (3, math.ceil(num_blocks / 2), 2)
    for j in range(paired.shape[1]):
        for t in range(2):  # scale[..., j, t] = block 2j + t, padding = byte 0
            expected = 2 * j + t + 1 if 2 * j + t < num_blocks else 0
            assert (paired[:, j, t] == expected).all()
    back = from_paired_scales(paired, num_blocks)
    assert back.dtype == torch.float8_e8m0fnu and torch.equal(back.view(torch.uint8), scale)


def test_paired_scales_accept_e8m0_and_check_shape():
    scale = torch.tensor([[127, 128, 129]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert to_paired_scales(scale).tolist() == [[[127, 128], [129, 0]]]
    with pytest.raises(ValueError, match="paired scales"):
        from_paired_scales(torch.zeros(1, 2, 2, dtype=torch.uint8), 5)


def _nz_oracle(a: torch.Tensor) -> torch.Tensor:
    rows, cols = a.shape
    c0 = 32 // a.element_size()
    nz = torch.zeros(math.ceil(cols / c0), math.ceil(rows / 16), 16, c0, dtype=a.dtype)
    for r in range(rows):
        for c in range(cols):
            nz[c // c0, r // 16, r % 16, c % c0] = a[r, c]
    return nz


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(16, 32), (17, 33), (5, 70), (48, 8)])
def test_nd_to_nz_matches_the_index_formula(dtype, shape):
    a = torch.randint(1, 100, shape).to(dtype)
    nz = nd_to_nz(a)
    assert nz.shape[-1] == 32 // a.element_size()
    assert torch.equal(nz, _nz_oracle(a))
    assert torch.equal(nz_to_nd(nz, *shape), a)


def test_nz_round_trip_with_batch_dims():
    a = torch.randint(-128, 127, (2, 3, 40, 100), dtype=torch.int8)
    nz = nd_to_nz(a)
    assert nz.shape == (2, 3, 4, 3, 16, 32)
    assert torch.equal(nz_to_nd(nz, 40, 100), a)


def test_nz_shape_errors():
    with pytest.raises(ValueError, match="rank"):
        nd_to_nz(torch.zeros(8, dtype=torch.int8))
    with pytest.raises(ValueError, match="NZ tensor"):
        nz_to_nd(torch.zeros(1, 1, 16, 32, dtype=torch.int8), 16, 64)

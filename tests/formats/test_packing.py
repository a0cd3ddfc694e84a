"""FP4 packing against op-plugin's test packer (pack_b4_to_b8: element 2i in bits 0-3)."""

import numpy as np
import pytest
import torch

from mxfx.formats import pack_fp4, unpack_fp4


def _pack_b4_to_b8(codes: np.ndarray) -> np.ndarray:
    """op-plugin test_npu_dual_level_quant_matmul.py's packer, on uint8 codes."""
    pairs = codes.reshape(-1, 2).astype(np.int32)
    return np.sum((pairs & 0b1111) << np.array([0, 4]), axis=1).astype(np.uint8).reshape(*codes.shape[:-1], -1)


@pytest.mark.parametrize("shape", [(2,), (3, 64), (2, 5, 18)])
def test_pack_matches_reference_packer_and_round_trips(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert np.array_equal(packed.numpy(), _pack_b4_to_b8(codes.numpy()))
    assert torch.equal(unpack_fp4(packed), codes)


def test_every_byte_unpacks_and_repacks():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_fp4(unpack_fp4(every)), every)
    assert unpack_fp4(torch.tensor([0x77, 0x21], dtype=torch.uint8)).tolist() == [7, 7, 1, 2]


def test_pack_non_contiguous_input():
    codes = torch.randint(0, 16, (8, 6), dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes.t())), codes.t())


def test_int8_storage_unpacks_like_uint8():
    packed = torch.tensor([0x8F - 256], dtype=torch.int8)
    assert unpack_fp4(packed).tolist() == [0xF, 0x8]


def test_errors():
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or int8"):
        unpack_fp4(torch.zeros(2))

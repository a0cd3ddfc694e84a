"""FP4 packing against op-plugin's test packer (pack_b4_to_b8: element 2i in bits 0-3); int4 packing
against op-plugin's npu_convert_weight_to_int4pack (8 values per int32) and msmodelslim's
w4a8_pack_int4, with ml_dtypes.int4 decoding the nibbles."""

import ml_dtypes
import numpy as np
import pytest
import torch

from mxfx.formats import pack_fp4, pack_int4, unpack_fp4, unpack_int4


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


def _int4pack(values: np.ndarray) -> np.ndarray:
    """op-plugin ConvertWeightToINT4PackKernelNpuOpApi.cpp: out[i] = a&0xF | (b&0xF)<<4 | ... | (h&0xF)<<28."""
    eights = values.reshape(-1, 8).astype(np.int64) & 0xF
    words = np.sum(eights << np.arange(0, 32, 4), axis=1).astype(np.uint32).view(np.int32)
    return words.reshape(*values.shape[:-1], -1)


def _msmodelslim_pack(values: torch.Tensor) -> torch.Tensor:
    """msmodelslim save/utils/pack.py _pack_int4 (pairs along the last dim)."""
    pairs = values.to(torch.int8).reshape(-1, 2)
    packed = torch.bitwise_or(torch.bitwise_left_shift(pairs[:, 1:], 4), pairs[:, :1] & 0b00001111)
    return packed.reshape(*values.shape[:-1], -1)


@pytest.mark.parametrize("shape", [(8,), (4, 64), (3, 2, 24)])
def test_int4_pack_matches_npu_int4pack_and_msmodelslim(shape):
    values = torch.randint(-8, 8, shape, dtype=torch.int32)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert np.array_equal(packed.view(torch.int32).numpy(), _int4pack(values.numpy()))
    assert torch.equal(packed.view(torch.int8), _msmodelslim_pack(values))
    assert torch.equal(unpack_int4(packed), values.to(torch.int8))


def test_int4_every_nibble_decodes_as_ml_dtypes_int4():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    nibbles = unpack_fp4(every).numpy()
    assert np.array_equal(unpack_int4(every).numpy(), nibbles.view(ml_dtypes.int4).astype(np.int8))
    assert torch.equal(pack_int4(unpack_int4(every)), every)
    assert unpack_int4(torch.tensor([0x8F - 256], dtype=torch.int8)).tolist() == [-1, -8]


def test_int4_errors():
    with pytest.raises(ValueError, match=r"\[-8, 7\], got \[-9, 8\]"):
        pack_int4(torch.tensor([-9, 8]))
    with pytest.raises(ValueError, match="integer tensor"):
        pack_int4(torch.zeros(2))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))

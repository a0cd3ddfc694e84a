"""Nibble packing, two 4-bit values per byte with element 2i in the low nibble: E2M1 codes (OCP /
torch.float4_e2m1fn_x2) and two's-complement int4 (msmodelslim's W4A8_DYNAMIC bytes; read as
little-endian int32, the layout of torch_npu's npu_convert_weight_to_int4pack)."""

import sys

import torch

from ._checks import check_last_dim_even

# The fast path reads a byte pair as one little-endian int16: the low byte is element 2i.
assert sys.byteorder == "little", "mxfx.formats.packing assumes a little-endian host"


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (values 0-15) -> uint8 [..., K/2]."""
    check_last_dim_even(codes, "pack_fp4")
    pairs = codes.to(torch.uint8).contiguous().view(torch.int16)  # lo | hi << 8
    return (pairs | (pairs >> 4)).to(torch.uint8)  # low byte: lo | hi << 4


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 codes [..., K]."""
    if packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"unpack_fp4: packed FP4 data must be uint8 or int8, got {packed.dtype}")
    byte = packed.view(torch.uint8)
    return torch.stack((byte & 0xF, byte >> 4), dim=-1).flatten(-2)


INT4_MIN, INT4_MAX = -8, 7


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Integer values [..., K] in [-8, 7] -> uint8 [..., K/2]."""
    if values.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"pack_int4: values must be an integer tensor, got {values.dtype}")
    check_last_dim_even(values, "pack_int4")
    if values.numel() and (values.min() < INT4_MIN or values.max() > INT4_MAX):
        raise ValueError(f"pack_int4: values must lie in [{INT4_MIN}, {INT4_MAX}], got "
                         f"[{values.min().item()}, {values.max().item()}]")
    return pack_fp4((values & 0xF).to(torch.uint8))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 or int8 [..., K/2] -> int8 [..., K] in [-8, 7]."""
    nibbles = unpack_fp4(packed).to(torch.int8)
    return (nibbles ^ 8) - 8  # two's complement: 8..15 -> -8..-1

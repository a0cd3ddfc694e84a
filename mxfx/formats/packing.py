"""FP4 nibble packing: two E2M1 codes per byte, element 2i in the low nibble (OCP / torch.float4_e2m1fn_x2)."""

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

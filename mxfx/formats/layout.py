"""torch_npu tensor layouts: E8M0 scales in pairs, and FRACTAL_NZ (format 29) emulated as a permutation."""

import math

import torch

from .e8m0 import as_e8m0_bytes

NZ_ROWS = 16  # r0: rows per fractal
NZ_C0_BYTES = 32  # c0: bytes per fractal row


def to_paired_scales(scale: torch.Tensor) -> torch.Tensor:
    """[..., G] E8M0 scales -> torch_npu's uint8 [..., ceil(G/2), 2], an odd count padded with byte 0."""
    byte = as_e8m0_bytes(scale)
    if byte.shape[-1] % 2:
        byte = torch.nn.functional.pad(byte, (0, 1), value=0)
    return byte.reshape(*byte.shape[:-1], byte.shape[-1] // 2, 2)


def from_paired_scales(paired: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """torch_npu's [..., ceil(G/2), 2] scales -> float8_e8m0fnu [..., G] (G = num_blocks)."""
    byte = as_e8m0_bytes(paired)
    if byte.dim() < 2 or byte.shape[-1] != 2 or byte.shape[-2] != math.ceil(num_blocks / 2):
        raise ValueError(
            f"paired scales must have shape [..., {math.ceil(num_blocks / 2)}, 2] for {num_blocks} blocks, "
            f"got {list(byte.shape)}"
        )
    return byte.flatten(-2)[..., :num_blocks].view(torch.float8_e8m0fnu)


def nz_c0(dtype: torch.dtype) -> int:
    """Elements per fractal row: 32 bytes (int8/uint8: 32, bf16/fp16: 16, fp32: 8)."""
    return NZ_C0_BYTES // dtype.itemsize


def nd_to_nz(a: torch.Tensor, c0: int | None = None) -> torch.Tensor:
    """FRACTAL_NZ of [..., R, C]: [..., ceil(C/c0), ceil(R/16), 16, c0], zero padded.

    nz[..., c1, r1, r0, i] = a[..., 16*r1 + r0, c0*c1 + i]; the ops-nn goldens' layout of format 29.
    c0 defaults to 32 bytes of a's dtype; packed FP4 cast with an FP8 customize_dtype takes c0 = 32 FP4
    elements, i.e. c0=16 on its uint8 bytes (aclnnNpuFormatCast: C0 = 32B / size of additionalDtype).
    """
    if a.dim() < 2:
        raise ValueError(f"nd_to_nz needs a tensor of rank >= 2, got shape {list(a.shape)}")
    rows, cols = a.shape[-2:]
    c0 = c0 or nz_c0(a.dtype)
    r1, c1 = math.ceil(rows / NZ_ROWS), math.ceil(cols / c0)
    padded = torch.nn.functional.pad(a, (0, c1 * c0 - cols, 0, r1 * NZ_ROWS - rows))
    tiles = padded.reshape(*a.shape[:-2], r1, NZ_ROWS, c1, c0)
    return tiles.movedim(-2, -4).contiguous()


def nz_to_nd(nz: torch.Tensor, rows: int, cols: int, c0: int | None = None) -> torch.Tensor:
    """Inverse of nd_to_nz: [..., C1, R1, 16, c0] -> [..., rows, cols] (the padding is dropped)."""
    c0 = c0 or nz_c0(nz.dtype)
    expected = (math.ceil(cols / c0), math.ceil(rows / NZ_ROWS), NZ_ROWS, c0)
    if nz.dim() < 4 or tuple(nz.shape[-4:]) != expected:
        raise ValueError(
            f"NZ tensor for [{rows}, {cols}] {nz.dtype} must end in {list(expected)}, got {list(nz.shape)}")
    tiles = nz.movedim(-4, -2)  # [..., R1, 16, C1, c0]
    nd = tiles.reshape(*nz.shape[:-4], expected[1] * NZ_ROWS, expected[0] * c0)
    return nd[..., :rows, :cols].contiguous()

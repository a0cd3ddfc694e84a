"""Views of the last axis as blocks, and block statistics, shared by the MX quantizers."""

import math

import torch


def split_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., K] -> [..., ceil(K/block_size), block_size]; a short last block is zero padded, as the
    Ascend kernels pad their tail in on-chip memory (zeros never change a block's abs-max)."""
    k = x.shape[-1]
    num_blocks = math.ceil(k / block_size)
    if num_blocks * block_size != k:
        x = torch.nn.functional.pad(x, (0, num_blocks * block_size - k))
    return x.reshape(*x.shape[:-1], num_blocks, block_size)


def merge_blocks(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of split_blocks: [..., G, block] -> [..., k]."""
    return blocks.flatten(-2)[..., :k]


def block_abs_max(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| over the last axis in the input dtype, NaN if the block holds a NaN.

    Two reductions instead of abs() + one reduction: no full-size temporary is allocated.
    """
    return torch.maximum(blocks.amax(-1), blocks.amin(-1).neg())

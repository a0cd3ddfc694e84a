"""Block-diagonal rotations (arXiv 2511.04214, "Block Rotation is All You Need for MXFP4"): R = diag(R_1, ...,
R_n) with orthogonal b x b blocks inside the MX blocks, so x W^T = (x R)(W R)^T and outlier energy is spread
within a block only (a global rotation inflates the power-of-two scales of every other block)."""

import math
from dataclasses import dataclass

import torch

BLOCK_SIZES = (32, 64, 128)
KINDS = ("hadamard", "random")


def hadamard(b: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of order b (a power of two), fp64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def random_orthogonal(b: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal b x b matrix (QR of a Gaussian, signs fixed by R's diagonal), fp64."""
    q, r = torch.linalg.qr(torch.randn(b, b, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@dataclass(frozen=True)
class BlockRotation:
    """Which rotation: block size (32, 64, 128), kind ("hadamard": the same Hadamard block everywhere;
    "random": a seeded random orthogonal block per position, the same for every linear with that K)."""

    block: int = 32
    kind: str = "hadamard"
    seed: int = 0

    def __post_init__(self):
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"rotation block must be one of {BLOCK_SIZES} (inside the MX blocks), got {self.block}")
        if self.kind not in KINDS:
            raise ValueError(f"rotation kind must be one of {KINDS}, got {self.kind!r}")

    def check(self, k: int, linear: str) -> None:
        if k % self.block:
            raise ValueError(f"linear {linear}: rotation block {self.block} does not divide K={k}")

    def activation_blocks(self, k: int) -> torch.Tensor:
        """The activation's blocks A [K/b, b, b] (fp64 holding bf16 values, so the graph's bf16 rotation
        uses exactly them): Hadamard as +-2^-ceil(log2(b)/2) (orthogonal up to a power of two, which the
        MX scales absorb), random orthogonal blocks rounded to bf16."""
        n = k // self.block
        if self.kind == "hadamard":
            signs = hadamard(self.block) * math.sqrt(self.block)
            return (signs * 2.0 ** -math.ceil(math.log2(self.block) / 2)).expand(n, -1, -1).clone()
        generator = torch.Generator().manual_seed(self.seed)
        blocks = torch.stack([random_orthogonal(self.block, generator) for _ in range(n)])
        return blocks.to(torch.bfloat16).double()

    def weight_blocks(self, k: int) -> torch.Tensor:
        """A^-T per block, fp64: (x A)(W A^-T)^T = x W^T for any invertible A (the Hadamard's blocks are one
        block repeated: inverted once)."""
        blocks = self.activation_blocks(k)
        if self.kind == "hadamard":
            return torch.linalg.inv(blocks[0]).T.expand_as(blocks).clone()
        return torch.linalg.inv(blocks).transpose(-1, -2)

def rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ diag(blocks) along the last axis, in x's dtype (fp32 in: fp32 arithmetic). For a weight W
    [N, K], rotate(W, R) is W R; for an activation, x R."""
    n, b = blocks.shape[0], blocks.shape[-1]
    lead = x.shape[:-1]
    y = torch.matmul(x.reshape(-1, n, b).transpose(0, 1), blocks.to(x.dtype))  # [n, M, b]
    return y.transpose(0, 1).reshape(*lead, n * b)

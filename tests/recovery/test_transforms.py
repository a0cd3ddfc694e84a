"""Rotation and smoothing are exact in real arithmetic: (x A)(W A^-T)^T = x W^T and (x s)(W / s)^T = x W^T,
checked in fp64 against plain matrix products (torch.block_diag as the independent rotation)."""

import math

import numpy as np
import pytest
import torch

from mxfx.recovery.rotation import BlockRotation, hadamard, rotate
from mxfx.recovery.smoothing import SCALE_MIN, smooth_scale


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_is_exact_in_real_arithmetic(block, kind):
    k = 512
    rotation = BlockRotation(block, kind, seed=3)
    a, a_inv_t = rotation.activation_blocks(k), rotation.weight_blocks(k)
    x, w = torch.randn(7, k, dtype=torch.float64), torch.randn(5, k, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, a) @ rotate(w, a_inv_t).T, x @ w.T, rtol=1e-10, atol=1e-10)
    # block diagonal: rotate() is x @ diag(A_1, ..., A_n), and nothing crosses a block
    torch.testing.assert_close(rotate(x, a), x @ torch.block_diag(*a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_activation_blocks_are_exact_in_bf16_and_hadamard_is_orthogonal_up_to_a_power_of_two(block):
    for kind in ("hadamard", "random"):
        a = BlockRotation(block, kind).activation_blocks(1024)
        assert torch.equal(a.to(torch.bfloat16).double(), a)
    a = BlockRotation(block).activation_blocks(block)[0]
    gain = block * 4.0 ** -math.ceil(math.log2(block) / 2)
    torch.testing.assert_close(a @ a.T, gain * torch.eye(block, dtype=torch.float64), rtol=0, atol=1e-12)
    h = hadamard(block)
    torch.testing.assert_close(h @ h.T, torch.eye(block, dtype=torch.float64), rtol=0, atol=1e-12)


def test_random_blocks_differ_by_position_and_seed_and_repeat_for_a_seed():
    r = BlockRotation(32, "random", seed=1)
    blocks = r.activation_blocks(128)
    assert not torch.equal(blocks[0], blocks[1])
    assert torch.equal(blocks, BlockRotation(32, "random", seed=1).activation_blocks(128))
    assert not torch.equal(blocks, BlockRotation(32, "random", seed=2).activation_blocks(128))


def test_bad_rotations_are_refused_by_name():
    with pytest.raises(ValueError, match="rotation block must be one of"):
        BlockRotation(48)
    with pytest.raises(ValueError, match="kind"):
        BlockRotation(32, "dct")
    with pytest.raises(ValueError, match="linear layers.0.down_proj: rotation block 128 does not divide K=1472"):
        BlockRotation(128).check(1472, "layers.0.down_proj")


def test_smoothing_is_exact_in_real_arithmetic():
    x, w = torch.randn(9, 64, dtype=torch.float64) * 10, torch.randn(3, 64, dtype=torch.float64)
    s = smooth_scale(x.abs().amax(0), [w], 0.5).double()
    torch.testing.assert_close((x * s) @ (w / s).T, x @ w.T, rtol=1e-10, atol=1e-10)


def test_smooth_scale_is_smoothquant_over_all_linears_on_the_activation():
    rng = np.random.default_rng(0)
    amax_x = rng.uniform(0.01, 30, 64).astype(np.float32)
    weights = [rng.normal(size=(n, 64)).astype(np.float32) for n in (16, 8)]
    alpha = 0.7
    amax_w = np.maximum(np.abs(weights[0]).max(0), np.abs(weights[1]).max(0))
    expected = amax_w ** (1 - alpha) / amax_x ** alpha  # x * s: the activation divided by SmoothQuant's scale
    got = smooth_scale(torch.from_numpy(amax_x), [torch.from_numpy(w) for w in weights], alpha)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    balanced = smooth_scale(torch.from_numpy(amax_x), [torch.from_numpy(w) for w in weights], 0.5).numpy()
    np.testing.assert_allclose(amax_x * balanced, amax_w / balanced, rtol=1e-5)  # alpha 0.5: equal ranges
    dead = smooth_scale(torch.zeros(64), [torch.from_numpy(weights[0])], alpha)
    assert (dead >= SCALE_MIN).all() and torch.isfinite(dead).all()
    with pytest.raises(ValueError, match="alpha"):
        smooth_scale(torch.ones(64), [torch.ones(2, 64)], 1.5)

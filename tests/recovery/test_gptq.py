"""GPTQ and the scale search on the MX grids: with no information (identity Gram) GPTQ is the kernels'
round to nearest, bit for bit; on a toy layer it matches an independent textbook GPTQ (sequential OBS
updates with an explicit inverse downdate, fp64, its own FP4 grid) and beats round to nearest."""

import numpy as np
import pytest
import torch

import mxfx.ops  # noqa: F401
from mxfx.formats import dequantize_dual_level, dequantize_mx, from_paired_scales
from mxfx.recovery.gptq import gptq, round_to_nearest
from mxfx.recovery.grids import DualLevelGrid, SingleLevelGrid

mx = torch.ops.mxfx
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def _weight(n=48, k=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * torch.rand(k, generator=g) * 0.05).bfloat16()


def _correlated_inputs(m, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(m, k, generator=g) @ mixing * torch.rand(k, generator=g) * 3


@pytest.mark.parametrize("grid", ["dual", "fp4", "fp8"])
def test_gptq_with_identity_gram_is_the_kernels_round_to_nearest(grid):
    w = _weight()
    n, k = w.shape
    g = {"dual": DualLevelGrid(n, k), "fp4": SingleLevelGrid(n, k, "fp4_e2m1"),
         "fp8": SingleLevelGrid(n, k, "fp8_e4m3")}[grid]
    dequantized = gptq(w, torch.eye(k), g, damp=0.0)
    codes = g.result()
    if grid == "dual":
        expected = mx.npu_dynamic_dual_level_mx_quant(w)
        got = (codes["q"], codes["level0"], codes["level1"])
        values = dequantize_dual_level(codes["q"], codes["level0"], from_paired_scales(codes["level1"], k // 32))
    else:
        expected = mx.npu_dynamic_mx_quant(w, dst_type=296 if grid == "fp4" else 292)
        got = (codes["q"], codes["scale"])
        values = dequantize_mx(codes["q"], from_paired_scales(codes["scale"], k // 32), f"{grid}_e2m1" if grid == "fp4"
                               else "fp8_e4m3")
    for a, b in zip(got, expected):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(values, dequantized)  # what gptq returns is what the codes decode to


def _fp4_qdq(w, scale):
    """Nearest E2M1 value (ties to even code) of w / scale, saturated, times scale: the test's own grid."""
    mags = np.abs(w / scale)[..., None]
    distance = np.abs(mags - E2M1)
    best = np.argmin(distance + 1e-9 * (np.arange(8) % 2), axis=-1)  # ties: the even code
    return np.sign(w) * E2M1[best] * scale


def _textbook_gptq(w, h, damp):
    """OBS column by column (Frantar et al., Algorithm 1 without lazy batches), fp64; group scales from the
    updated weights when each 32-group starts: 2^(floor(log2 amax) - 2)."""
    w = w.astype(np.float64).copy()
    k = w.shape[1]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    q = np.zeros_like(w)
    for i in range(k):
        if i % 32 == 0:
            amax = np.abs(w[:, i:i + 32]).max(1)
            scale = 2.0 ** (np.floor(np.log2(amax)) - 2)
        q[:, i] = _fp4_qdq(w[:, i], scale)
        error = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i + 1:] -= np.outer(error, hinv[i, i + 1:])
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]  # remove column i from the problem
    return q


def test_gptq_matches_a_textbook_implementation_and_beats_round_to_nearest(record_property):
    n, k = 32, 256
    w = _weight(n, k).float()
    x = _correlated_inputs(2048, k)
    h = (x.double().T @ x.double())
    ours = gptq(w, h, SingleLevelGrid(n, k, "fp4_e2m1"), damp=0.01).double()
    textbook = torch.from_numpy(_textbook_gptq(w.double().numpy(), h.numpy(), 0.01))
    assert (ours == textbook).double().mean() > 0.99  # a few codes may flip on fp32-vs-fp64 near-ties

    rtn = round_to_nearest(w, SingleLevelGrid(n, k, "fp4_e2m1")).double()
    def error(q):
        return ((x.double() @ (q - w.double()).T) ** 2).sum().item()
    ratio = error(ours) / error(rtn)
    record_property("measured", f"GPTQ / RTN layer-output squared error on a toy FP4 layer: {ratio:.3f}")
    assert ratio < 0.75 and abs(error(ours) / error(textbook) - 1) < 0.02


def test_gptq_on_the_dual_level_grid_beats_round_to_nearest():
    n, k = 32, 1024
    w = _weight(n, k)
    x = _correlated_inputs(4096, k)
    h = x.double().T @ x.double()
    ours = gptq(w, h, DualLevelGrid(n, k))
    rtn = round_to_nearest(w, DualLevelGrid(n, k))
    def error(q):
        return ((x @ (q - w.float()).T) ** 2).sum().item()
    assert error(ours) < 0.75 * error(rtn)


def test_mse_scale_search_is_never_worse_per_block_and_sometimes_better():
    n, k = 64, 512
    w = _weight(n, k, seed=4).float()
    floor = round_to_nearest(w, SingleLevelGrid(n, k, "fp4_e2m1"))
    searched = round_to_nearest(w, SingleLevelGrid(n, k, "fp4_e2m1", scale_search="mse"))
    block_error = [((q - w) ** 2).reshape(n, -1, 32).sum(-1) for q in (floor, searched)]
    assert (block_error[1] <= block_error[0]).all() and (block_error[1] < block_error[0]).any()


def test_gptq_refuses_a_gram_of_the_wrong_size_and_grids_refuse_bad_arguments():
    with pytest.raises(ValueError, match="Gram matrix \\[64, 64\\] does not match K=128"):
        gptq(torch.zeros(4, 128), torch.eye(64), SingleLevelGrid(4, 128, "fp4_e2m1"))
    with pytest.raises(ValueError, match="scale_search"):
        SingleLevelGrid(4, 128, "fp4_e2m1", scale_search="best")
    with pytest.raises(ValueError, match="multiple of 32"):
        DualLevelGrid(4, 100)

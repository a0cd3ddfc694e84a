"""SQNR sanity on Gaussian data: the figures MX papers and torchao report (about 30.6 dB for MXFP8,
18.8 dB for MXFP4 and for dual-level). A broken scale or rounding rule moves these by several dB."""

import pytest
import torch

from mxfx.formats import dequantize_dual_level, dequantize_mx, quantize_dual_level, quantize_mx


def _sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double()
    return (10 * torch.log10(x.pow(2).sum() / (x - y.double()).pow(2).sum())).item()


def _mx_round_trip(fmt):
    def round_trip(x):
        return dequantize_mx(*quantize_mx(x, fmt), fmt)

    return round_trip


def _dual_round_trip(x):
    return dequantize_dual_level(*quantize_dual_level(x))


@pytest.mark.parametrize(
    "name, round_trip, expected_db",
    [
        ("mxfp8", _mx_round_trip("fp8_e4m3"), 30.6),
        ("mxfp4", _mx_round_trip("fp4_e2m1"), 18.8),
        ("dual_level", _dual_round_trip, 18.8),
    ],
    ids=["mxfp8", "mxfp4", "dual_level"],
)
def test_sqnr_on_randn(name, round_trip, expected_db, record_property):
    x = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    sqnr = _sqnr_db(x, round_trip(x))
    record_property("measured", f"SQNR {name}: {sqnr:.2f} dB (expected about {expected_db} dB)")
    assert abs(sqnr - expected_db) < 0.5, f"{name}: SQNR {sqnr:.2f} dB, expected about {expected_db} dB"

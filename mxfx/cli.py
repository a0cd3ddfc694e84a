"""The `mxfx` command line. `mxfx formats` quantizes a tensor with every MX format and reports what it did."""

import argparse
import time

import torch

from .formats import dequantize_dual_level, dequantize_mx, quantize_dual_level, quantize_mx


def _sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double()
    return (10 * torch.log10(x.pow(2).sum() / (x - y.double()).pow(2).sum())).item()


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _formats_report(x: torch.Tensor) -> str:
    rows = []
    quantizers = {
        "mxfp8 (E4M3, E8M0/32)": lambda: quantize_mx(x, "fp8_e4m3"),
        "mxfp4 (E2M1, E8M0/32)": lambda: quantize_mx(x, "fp4_e2m1"),
        "dual-level (E2M1, E8M0/32, FP32/512)": lambda: quantize_dual_level(x),
    }
    dequantizers = [
        lambda q: dequantize_mx(*q, "fp8_e4m3"),
        lambda q: dequantize_mx(*q, "fp4_e2m1"),
        lambda q: dequantize_dual_level(*q),
    ]
    for (name, quantize), dequantize in zip(quantizers.items(), dequantizers):
        start = time.perf_counter()
        quantized = quantize()
        elapsed = time.perf_counter() - start
        y = dequantize(quantized)
        scale_bytes = quantized[-1].view(torch.uint8)
        rows.append(
            (
                name,
                f"{_nbytes(*quantized) / 2**20:.2f} MiB",
                f"{8 * _nbytes(*quantized) / x.numel():.4f}",
                f"{_sqnr_db(x, y):.2f}",
                f"{(x.float() - y).abs().max().item():.4g}",
                f"{int(scale_bytes.min())}..{int(scale_bytes.max())}",
                f"{elapsed * 1e3:.1f}",
            )
        )
    header = ("format", "size", "bits/elem", "SQNR dB", "max |err|", "E8M0 bytes", "ms")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"input: {x.dtype} {list(x.shape)}, {_nbytes(x) / 2**20:.2f} MiB (16 bits/elem), randn seed 0"]
    for row in [header, *rows]:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mxfx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    formats = commands.add_parser("formats", help="quantize a random bf16 tensor with each MX format and report")
    formats.add_argument("--rows", type=int, default=1024)
    formats.add_argument("--cols", type=int, default=4096, help="the quantized (last) axis")
    args = parser.parse_args(argv)
    x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).bfloat16()
    try:
        print(_formats_report(x))
    except ValueError as error:
        parser.error(str(error))
    return 0

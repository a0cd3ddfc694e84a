"""Throughput of the MX quantizers on a 4096x4096 bf16 tensor, in GB/s of input and as a ratio to
Tensor.copy_ bandwidth measured in the same run (best of N, the candidates interleaved so that a noisy
neighbour hits all of them alike). Each quantizer runs on both implementations (native C kernels and the
torch code, see mxfx.formats.native); their outputs are checked byte for byte before any number is
printed. Goal: ratio >= 0.25."""

import argparse

import torch
from timing import best_seconds

from mxfx.formats import native, quantize_dual_level, quantize_mx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round counts")
    args = parser.parse_args()

    x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = torch.empty_like(x)
    quantizers = {
        "quantize_dual_level": lambda: quantize_dual_level(x),
        "quantize_mx(fp8_e4m3)": lambda: quantize_mx(x, "fp8_e4m3"),
        "quantize_mx(fp4_e2m1)": lambda: quantize_mx(x, "fp4_e2m1"),
    }
    if not native.available():
        raise SystemExit(f"native MX kernels unavailable: {native.unavailable_reason()}")
    for name, fn in quantizers.items():  # the two implementations must agree byte for byte
        with native.use("native"):
            got = fn()
        with native.use("torch"):
            expected = fn()
        for a, b in zip(got, expected):
            a, b = a.contiguous(), b.contiguous()
            raw = (lambda t: t.view(torch.int32)) if a.element_size() == 4 else (lambda t: t.view(torch.uint8))
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(raw(a), raw(b)):
                raise SystemExit(f"FAIL: {name}: native and torch outputs differ on the benchmark tensor")

    def in_mode(fn, chosen):
        def run():
            with native.use(chosen):
                fn()
        return run

    candidates = {"copy_": lambda: out.copy_(x)}
    for name, fn in quantizers.items():
        candidates[f"{name} native"] = in_mode(fn, "native")
        candidates[f"{name} torch"] = in_mode(fn, "torch")
    seconds = {name: float("inf") for name in candidates}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            seconds[name] = min(seconds[name], best_seconds(fn, args.repeats))

    gigabytes = x.numel() * x.element_size() / 1e9
    print(f"input bf16 {list(x.shape)} ({gigabytes * 1e3:.1f} MB), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("native and torch outputs identical (bytes) on this tensor")
    print(f"{'':32s} {'ms':>8s} {'GB/s':>8s} {'ratio to copy_':>15s}")
    for name, s in seconds.items():
        print(f"{name:32s} {s * 1e3:8.2f} {gigabytes / s:8.2f} {seconds['copy_'] / s:15.3f}")


if __name__ == "__main__":
    main()

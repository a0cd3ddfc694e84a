"""The reference quantized linear (activation quant + quant matmul against prepared weights, the ops the
rewritten graph runs on the reference target) against bf16 F.linear, K = N = 2048 and 4096, at M = 1 and
128, for the online schemes and for a W4A8_DYNAMIC checkpoint linear (int4, group 128; random codes).
Ratios from one run (best of N). Goal for the MX schemes: <= 1.0x at M = 1, <= 1.5x at M = 128. Also
prints the bytes each prepared weight holds (the MX matmuls read them in place; nothing else is kept)."""

import argparse
import time

import torch
from timing import best_seconds

from mxfx.checkpoint import TYPES, QuantizedWeight, pack_int4_rows
from mxfx.formats import native
from mxfx.metrics import nbytes
from mxfx.schemes import SCHEMES
from mxfx.stored_weights import STORED_WEIGHTS
from mxfx.targets import get_target


def int4_checkpoint_weight(n: int, k: int, generator) -> tuple[torch.Tensor, QuantizedWeight]:
    """A bf16 weight with random stored int4 codes, registered as mxfx.checkpoint.load registers them."""
    values = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8)
    stored = QuantizedWeight(TYPES["W4A8_DYNAMIC"], {
        "weight": pack_int4_rows(values),
        "weight_scale": torch.rand(n, 1, generator=generator) * 0.01,
        "weight_scale_second": torch.rand(n, k // 128, generator=generator) + 0.5,
    }, 128)
    weight = stored.dequantize()
    STORED_WEIGHTS.add(weight, stored)
    return weight, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="K = N")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch and kernel threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the thread's CPU time (with --threads 1: all work on the calling thread), which "
                             "time descheduled on a loaded machine does not count")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and torch.get_num_threads() != 1:
        parser.error("--cpu-time needs --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul path {native.matmul_path()}, "
          f"{'thread CPU' if args.cpu_time else 'wall'} time")
    for size in args.sizes:
        run(size, size, args.repeats, clock)


def run(k: int, n: int, repeats: int, clock=time.perf_counter) -> None:
    target = get_target("reference")
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(n, k, generator=generator) * 0.02).bfloat16()
    int4_weight, stored = int4_checkpoint_weight(n, k, generator)
    schemes = {
        **{name: (scheme, weight) for name, scheme in SCHEMES.items()},
        "w4a8_dynamic": (stored.scheme, int4_weight),
    }
    columns = list(schemes)
    prepared = {name: scheme.prepare(target, w, None, torch.bfloat16) for name, (scheme, w) in schemes.items()}
    bits = ", ".join(f"{name} {nbytes(p.values()) * 8 / (n * k):.3f}" for name, p in prepared.items())
    print(f"K={k} N={n}; prepared bits per weight element: {bits}")
    print(f"{'':12s} {'M':>4s} {'bf16 ms':>9s} " + " ".join(f"{name:>18s}" for name in columns))
    for m in (1, 128):
        x = torch.randn(m, k, generator=generator).bfloat16()
        candidates = {"bf16": lambda x=x: torch.nn.functional.linear(x, weight)}
        for name, (scheme, _) in schemes.items():
            candidates[name] = lambda s=scheme, p=prepared[name], x=x: s.linear(target, x, p)
        seconds = {name: min(best_seconds(fn, repeats, clock) for _ in range(2)) for name, fn in candidates.items()}
        cells = " ".join(f"{seconds[n] * 1e3:8.2f} ms {seconds[n] / seconds['bf16']:5.2f}x" for n in columns)
        print(f"{'linear':12s} {m:4d} {seconds['bf16'] * 1e3:9.3f} {cells}")


if __name__ == "__main__":
    main()

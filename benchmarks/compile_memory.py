"""Memory of compiling an 8-layer Qwen3-0.6B-shaped model (qwen3_shapes.qwen3_06b_shaped) with mxfx on
the reference target: the process's peak RSS above its level before the model existed, divided by the
model's bf16 weight bytes (goal: <= 1.3); the prepared weight bytes divided by the bf16 bytes of the
linears they replace (mxfp4_dual: exactly 4.3125/16); and what stays resident after the first forward:
RSS above the baseline less the bf16 weights of the quantized linears (the user's model keeps them; a
quantized checkpoint need not have them), divided by what the compiled model needs, its prepared bytes
plus its unquantized weight bytes (goal: <= 1.1; the reference matmuls read the prepared bytes in place,
so nothing decoded is kept), also net of what Dynamo itself keeps (its graphs, guards and code: the same
compile with Dynamo's "eager" backend, measured in a child process). RSS is sampled every millisecond
from /proc/self/statm."""

import argparse
import ctypes
import gc
import subprocess
import sys

import torch
from memory import PeakRSS, rss
from qwen3_shapes import qwen3_06b_shaped
from transformers import Qwen3ForCausalLM

import mxfx
from mxfx.prepared import PREPARED


def _trim() -> None:
    """Give freed heap back to the OS (glibc malloc_trim), so that RSS counts what is held, not what the
    allocator keeps after the compile's transient tensors; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--scheme", default="mxfp4_dual", choices=["mxfp4_dual", "mxfp4_w4a8", "mxfp8", "mxfp4"])
    parser.add_argument("--dynamo-only", action="store_true",
                        help="print only the bytes Dynamo's eager backend keeps resident (the child run)")
    args = parser.parse_args()
    if args.dynamo_only:
        print(dynamo_resident(args.layers))
        return
    baseline, model, weight_bytes = _model(args.layers, mxfx.backend())
    linear_bytes = sum(m.weight.numel() * 2 for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head")
    loaded = rss()
    be = mxfx.backend(args.scheme, target="reference")
    compile_peak = {}

    def compile_only(gm, example_inputs):  # the peak up to the moment the backend has returned
        compiled = be(gm, example_inputs)
        compile_peak["bytes"] = max(peak.peak, rss())
        return compiled

    ids = torch.randint(0, 151936, (1, 16))
    with PeakRSS() as peak, torch.no_grad():
        compiled = torch.compile(model, backend=compile_only)
        compiled(ids)
    gc.collect()
    retained = rss() - baseline
    _trim()
    resident = rss() - baseline
    report = be.reports[-1]
    unquantized = weight_bytes - linear_bytes
    print(f"{args.layers}-layer Qwen3-0.6B-shaped model, {weight_bytes / 2**20:.0f} MiB of bf16 weights "
          f"({linear_bytes / 2**20:.0f} MiB in {len(report.rewritten)} quantized linears), scheme {args.scheme}")
    print(f"RSS above baseline: model loaded {(loaded - baseline) / 2**20:.0f} MiB, peak while compiling "
          f"{(compile_peak['bytes'] - baseline) / 2**20:.0f} MiB, peak with the first run "
          f"{(peak.peak - baseline) / 2**20:.0f} MiB")
    print(f"compile peak / bf16 weight bytes  {(compile_peak['bytes'] - baseline) / weight_bytes:.3f}   (goal <= 1.3)")
    print(f"prepared / replaced bf16 bytes    {PREPARED.nbytes / linear_bytes:.5f}   (mxfp4_dual: 4.3125/16 = "
          f"{4.3125 / 16:.5f})")
    print(f"after the first forward: RSS above baseline {retained / 2**20:.0f} MiB, after malloc_trim "
          f"{resident / 2**20:.0f} MiB (freed heap the allocator had kept), less the quantized linears' bf16 "
          f"weights {(resident - linear_bytes) / 2**20:.0f} MiB; prepared {PREPARED.nbytes / 2**20:.0f} MiB + "
          f"unquantized {unquantized / 2**20:.0f} MiB")
    print(f"resident / (prepared + unquantized) {(resident - linear_bytes) / (PREPARED.nbytes + unquantized):.3f}   "
          "(goal <= 1.1)")
    child = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--dynamo-only"], check=True,
                           capture_output=True, text=True)
    dynamo = int(child.stdout.split()[-1])
    net = (resident - linear_bytes - dynamo) / (PREPARED.nbytes + unquantized)
    print(f"the same compile with Dynamo's eager backend keeps {dynamo / 2**20:.0f} MiB above the model; net of it, "
          f"resident / (prepared + unquantized) {net:.3f}")


def _model(layers: int, backend) -> tuple[int, torch.nn.Module, int]:
    """(the RSS baseline, taken after a first compile with `backend` has done Dynamo's lazy imports; the
    seeded bf16 model built after it; its weight bytes)."""
    torch.compile(lambda x: x + 1, backend=backend)(torch.ones(2))
    torch._dynamo.reset()
    torch.manual_seed(0)
    baseline = rss()
    model = Qwen3ForCausalLM(qwen3_06b_shaped(layers)).to(torch.bfloat16).eval()
    return baseline, model, sum(p.numel() * p.element_size() for p in model.parameters())


def dynamo_resident(layers: int) -> int:
    """RSS above the model's own bytes after compiling it with Dynamo's "eager" backend and one forward."""
    baseline, model, weight_bytes = _model(layers, "eager")
    with torch.no_grad():
        torch.compile(model, backend="eager")(torch.randint(0, 151936, (1, 16)))
    gc.collect()
    _trim()
    return rss() - baseline - weight_bytes


if __name__ == "__main__":
    main()

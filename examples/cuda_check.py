"""The reference ops on a CUDA device against the CPU reference, and the time of a compiled Qwen3 forward.

    python examples/cuda_check.py [--layers 8] [--tokens 512]

1. Quantizers (npu_dynamic_mx_quant: FP8 and FP4 in every round mode; npu_dynamic_dual_level_mx_quant):
   CUDA vs CPU bit for bit, on bf16 values spanning many magnitudes.
2. Matmuls: each scheme's quantized linear on CUDA vs the CPU (the same prepared codes): bit for bit for
   FP4 x FP4 (mxfp4_dual, mxfp4: every 32-sum is exact), and for the FP8 schemes the largest difference
   in bf16 ulps (their 32-sums round; the CPU kernel and CUDA's BLAS add in different orders).
3. A Qwen3-0.6B-shaped model (random weights, from its config) compiled with mxfx on the reference
   target, on CUDA: seconds per forward against the eager bf16 model. Prints figures; exits 1 on a
   mismatch. Needs a CUDA device.
"""

import argparse
import sys
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import mxfx
import mxfx.ops  # noqa: F401  (registers torch.ops.mxfx)
from mxfx.schemes import SCHEMES
from mxfx.targets import get_target

ops = torch.ops.mxfx


def values(shape, seed):
    """bf16 randn times 10**e per row, e from -6 to 6: many scale bytes, zeros and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x *= 10.0 ** torch.randint(-6, 7, (shape[0], 1), generator=g)
    return x.to(torch.bfloat16)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: same dtype, shape and bytes (so -0 vs +0 and NaN payloads count)."""
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_quantizers(device) -> bool:
    ok = True
    x = values((64, 2048), 0)
    cases = {"mx fp8": lambda t: ops.npu_dynamic_mx_quant(t, dst_type=292)}
    for rm in ("rint", "round", "floor"):
        cases[f"mx fp4 {rm}"] = lambda t, rm=rm: ops.npu_dynamic_mx_quant(t, dst_type=296, round_mode=rm)
        cases[f"dual level {rm}"] = lambda t, rm=rm: ops.npu_dynamic_dual_level_mx_quant(t, round_mode=rm)
    for name, fn in cases.items():
        cpu, gpu = fn(x), fn(x.to(device))
        match = all(same(c, g) for c, g in zip(cpu, gpu))
        ok &= match
        print(f"quantizer {name:18s} {'bit-identical' if match else 'DIFFERS'}")
    return ok


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in bf16 steps between two bf16 tensors (same sign assumed near zero)."""
    ia, ib = (t.cpu().view(torch.int16).to(torch.int32) for t in (a, b))
    ia, ib = (torch.where(i < 0, -(i & 0x7FFF), i) for i in (ia, ib))
    return int((ia - ib).abs().max())


def check_matmuls(device) -> bool:
    ok = True
    target = get_target("reference")
    weight, x = values((512, 2048), 1) * 0.02, values((33, 2048), 2)
    for name, scheme in SCHEMES.items():
        prepared = scheme.prepare(target, weight, None, torch.bfloat16)
        cpu = scheme.linear(target, x, prepared)
        gpu = scheme.linear(target, x.to(device), {k: v.to(device) for k, v in prepared.items()})
        exact = name in ("mxfp4_dual", "mxfp4")
        if exact:
            match = same(cpu, gpu)
            print(f"matmul {name:12s} {'bit-identical' if match else 'DIFFERS'} (FP4 x FP4: must be)")
        else:
            ulps = bf16_ulps(cpu, gpu.cpu())
            match = ulps <= 2 and torch.equal(cpu.isnan(), gpu.cpu().isnan())
            print(f"matmul {name:12s} largest difference {ulps} bf16 ulps (FP8 sums round; tolerance 2)")
        ok &= match
    return ok


def seconds(fn, repeats=5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def time_qwen3(device, layers: int, tokens: int) -> None:
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    with torch.no_grad():
        eager = seconds(lambda: model(ids))
        for scheme in ("mxfp4_dual", "mxfp8"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=mxfx.backend(scheme, target="reference"))
            start = time.perf_counter()
            compiled(ids)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            t = seconds(lambda compiled=compiled: compiled(ids))
            print(f"Qwen3-0.6B-shaped, {layers} layers, {tokens} tokens, {scheme}: {t * 1e3:.1f} ms a forward "
                  f"({t / eager:.1f}x eager bf16 {eager * 1e3:.1f} ms; first call with compile {first:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_check: no CUDA device")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    ok = check_quantizers(device)
    ok &= check_matmuls(device)
    time_qwen3(device, args.layers, args.tokens)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

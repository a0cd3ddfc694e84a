"""Proof on hardware (Ascend 950 with torch_npu and torchair): a few minutes, fails loudly on a mismatch.

1. For each scheme, the device's quantizers against mxfx's CPU reference, bit for bit (codes and scales),
   on random and edge-case bf16 tensors; the quantized matmuls within rtol 1e-3 (the tolerance of the
   Ascend operator tests). The same for W4A8_DYNAMIC checkpoints' int4 path: the int4 packer bit for
   bit, npu_weight_quant_batchmatmul per channel and per group within rtol 1e-3.
2. A Qwen3 (a local checkpoint folder, or the shipped demo model) compiled with mxfx through torchair
   for each scheme: greedy tokens/s against bf16 eager on the NPU.

    python examples/npu_smoke.py [--model DIR] [--mode max-autotune|reduce-overhead]
"""

import argparse
import time

import torch

import mxfx
from mxfx import evaluation, textdata
from mxfx.cli import HelpFormatter, at_least
from mxfx.dynamo_backend import torchair_inner
from mxfx.ops import npu as npu_support
from mxfx.schemes import SCHEMES
from mxfx.targets import get_target


def _inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2048, generator=generator) * torch.logspace(-3, 3, 2048)
    x[0, :512] = 0.0  # a zero block
    x[1, 7] = float("inf")  # an inf block
    x[2, :32] = 1e-40  # subnormal block
    return x.bfloat16(), (torch.randn(256, 2048, generator=generator) * 0.02).bfloat16()


def _raw(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _same(name: str, device: torch.Tensor, reference: torch.Tensor) -> None:
    got, expected = _raw(device), _raw(reference)
    if device.dtype != reference.dtype or got.shape != expected.shape:
        raise SystemExit(f"FAIL {name}: device {device.dtype}{list(device.shape)}, "
                         f"reference {reference.dtype}{list(reference.shape)}")
    if not torch.equal(got, expected):
        raise SystemExit(f"FAIL {name}: {int((got != expected).sum())} elements differ from the reference")
    print(f"ok   {name}: bit-exact")


def check_kernels() -> None:
    npu, reference = get_target("npu"), get_target("reference")
    x, w = _inputs()
    for name, scheme in SCHEMES.items():
        outputs = []
        for target, (xt, wt) in ((npu, (x.npu(), w.npu())), (reference, (x, w))):
            prepared = scheme.prepare(target, wt, None, xt.dtype)
            outputs.append((scheme.quantize_activation(target, xt, prepared), scheme.linear(target, xt, prepared)))
        (act_npu, y_npu), (act_ref, y_ref) = outputs
        for i, (a, b) in enumerate(zip(act_npu, act_ref)):
            _same(f"{name} activation quant output {i}", a, b)
        _close(f"{name} matmul", y_npu, y_ref)


def _close(name: str, device: torch.Tensor, reference: torch.Tensor) -> None:
    """Within rtol 1e-3 where the reference is finite; non-finite outputs (the inf input row) must match."""
    got, expected = device.cpu().float(), reference.float()
    finite = expected.isfinite()
    if not torch.equal(got.isfinite(), finite) or not torch.equal(
        got[~finite].nan_to_num(), expected[~finite].nan_to_num()
    ):
        raise SystemExit(f"FAIL {name}: the non-finite outputs differ from the reference")
    error = ((got - expected).abs() / expected.abs().clamp_min(1e-3))[finite].max().item()
    if not error <= 1e-3:
        raise SystemExit(f"FAIL {name}: max relative error {error:.2e} > 1e-3")
    print(f"ok   {name}: max relative error {error:.2e}")


def check_int4() -> None:
    import torch_npu

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1024, generator=generator).bfloat16()
    values = torch.randint(-8, 8, (1024, 256), generator=generator, dtype=torch.int32)
    packed = torch.ops.mxfx.npu_convert_weight_to_int4pack(values)
    _same("npu_convert_weight_to_int4pack", torch_npu.npu_convert_weight_to_int4pack(values.npu()), packed)
    for group, rows in ((0, 1), (128, 8), (256, 4)):
        scale = (torch.rand(rows, 256, generator=generator) * 0.01 + 1e-4).bfloat16()
        scale = scale.flatten() if not group else scale
        device = torch_npu.npu_weight_quant_batchmatmul(x.npu(), packed.npu(), scale.npu(), antiquant_group_size=group)
        reference = torch.ops.mxfx.npu_weight_quant_batchmatmul(x, packed, scale, antiquant_group_size=group)
        _close(f"npu_weight_quant_batchmatmul int4, group {group}", device, reference)


@torch.no_grad()
def tokens_per_second(step, prompt: torch.Tensor, new_tokens: int) -> float:
    ids = prompt
    step(ids)  # compile / warm up
    start = time.perf_counter()
    for _ in range(new_tokens):
        ids = torch.cat([ids, step(ids).logits[:, -1:].argmax(-1)], dim=1)
    torch.npu.synchronize()
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=str(evaluation.SHIPPED_MODEL), help="a local Qwen3 folder")
    parser.add_argument("--mode", default="max-autotune", choices=["max-autotune", "reduce-overhead"],
                        help="torchair mode: GE graph or captured graph")
    parser.add_argument("--new-tokens", type=at_least(1), default=32, help="tokens timed per model")
    args = parser.parse_args()
    npu_support.install()  # torch_npu, an Ascend 950, the fake kernel, the GE converter
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never time an eager fallback
    check_kernels()
    check_int4()

    import torchair

    model = evaluation.load_model(args.model).npu()
    prompt = torch.tensor([textdata.encode("The with statement")]).npu()
    print(f"bf16 eager      {tokens_per_second(model, prompt, args.new_tokens):8.1f} tokens/s")
    for name in SCHEMES:
        torch._dynamo.reset()
        config = torchair.CompilerConfig()
        config.mode = args.mode
        be = mxfx.backend(name, target="npu", inner=torchair_inner(config))
        compiled = torch.compile(model, backend=be, dynamic=True)  # the sequence grows: one graph for all
        print(f"{name:15s} {tokens_per_second(compiled, prompt, args.new_tokens):8.1f} tokens/s "
              f"({len(be.reports[-1].rewritten)} linears rewritten)")


if __name__ == "__main__":
    main()

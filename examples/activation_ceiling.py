"""The accuracy a scheme's activation quantization alone leaves: the model with its weights kept in bf16 and
every linear the backend quantizes by default fed its input quantized and dequantized by the scheme's own
activation quantizer (optionally block-rotated first and the rotation undone after, in fp32), on the
held-out topics. Recipes that choose the weights' codes (GPTQ, the scale search) leave the activation's
rounding as it is, so this is the next-token agreement they approach from below.

    python examples/activation_ceiling.py [--model DIR] [--schemes mxfp4_dual ...] [--rotations 0 32 ...]

The unrotation's cast back to bf16 is one rounding the compiled graph does not have (it rotates the weight
instead): 2^-9 relative, against the FP4 grid's 2^-3.
"""

import argparse
import contextlib
import math

import torch

from mxfx import evaluation, textdata
from mxfx.cli import HelpFormatter
from mxfx.formats import dequantize_dual_level, dequantize_mx, quantize_dual_level, quantize_mx
from mxfx.ops.dtypes import FLOAT4_E2M1FN_X2, FLOAT8_E4M3FN
from mxfx.recovery.rotation import BlockRotation, rotate
from mxfx.schemes import SCHEMES, DualLevelMXFP4
from mxfx.selection import Selection

ELEMENT_FORMATS = {FLOAT8_E4M3FN: "fp8_e4m3", FLOAT4_E2M1FN_X2: "fp4_e2m1"}


def activation_rounding(scheme):
    """x -> dequantize(quantize(x)) as `scheme` quantizes its activations, in x's dtype."""
    if isinstance(scheme, DualLevelMXFP4):
        return lambda x: dequantize_dual_level(*quantize_dual_level(x), dtype=x.dtype)
    fmt = ELEMENT_FORMATS[scheme.activation_dst_type]
    return lambda x: dequantize_mx(*quantize_mx(x, fmt, round_mode=scheme.activation_round_mode), fmt, dtype=x.dtype)


@contextlib.contextmanager
def rounded_inputs(model: torch.nn.Module, scheme, block: int):
    """Forward pre-hooks on the default selection's linears; removed on exit (the model is not changed)."""
    rounding, selection, handles = activation_rounding(scheme), Selection(), []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or selection.skip(name) is not None:
            continue
        k = module.in_features
        blocks = BlockRotation(block).activation_blocks(k).float() if block else None
        inverse = torch.linalg.inv(blocks) if block else None

        def hook(_module, args, blocks=blocks, inverse=inverse):
            x = args[0]
            if blocks is None:
                return (rounding(x),)
            return (rotate(rounding(rotate(x.float(), blocks).to(x.dtype)).float(), inverse).to(x.dtype),)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=str(evaluation.SHIPPED_MODEL), help="a model folder trained on the "
                        "shipped text")
    parser.add_argument("--schemes", nargs="+", default=["mxfp4_dual", "mxfp4_w4a8"], choices=sorted(SCHEMES))
    parser.add_argument("--rotations", type=int, nargs="+", default=[0, 32, 64, 128],
                        help="Hadamard block sizes (0: no rotation)")
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens to evaluate (default: all)")
    args = parser.parse_args()

    model = evaluation.load_model(args.model)
    batches = evaluation.windows(textdata.tokens(textdata.split()[1]), 256, args.max_tokens)
    with torch.no_grad():
        bf16_predictions, bf16_loss = evaluation.predictions_and_loss(model, batches, 8, "bf16")
        print(f"bf16: perplexity {math.exp(bf16_loss):.4f} on {batches[:, 1:].numel()} held-out tokens; weights "
              "bf16 below, activations rounded")
        for name in args.schemes:
            for block in args.rotations:
                with rounded_inputs(model, SCHEMES[name], block):
                    predictions, loss = evaluation.predictions_and_loss(model, batches, 8, name)
                agreement = (predictions == bf16_predictions).float().mean().item()
                rotation = f"Hadamard {block}" if block else "no rotation"
                print(f"{name:12s} {rotation:14s} perplexity {math.exp(loss):.4f} "
                      f"({100 * (math.exp(loss - bf16_loss) - 1):+.2f}%), next token = bf16 {100 * agreement:.2f}%",
                      flush=True)


if __name__ == "__main__":
    main()

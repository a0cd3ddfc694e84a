"""Accuracy recovery measured: calibrate the shipped model on its training topics, then compare each
scheme with and without recipes on the held-out topics (perplexity against bf16, next-token agreement).

    python examples/measure_recipes.py [--model DIR] [--windows 64] [--max-tokens N]
        [--runs mxfp4_dual mxfp4_dual:rotate ...]

A run is SCHEME or SCHEME:RECIPE (mxfx.recipes.RECIPES names, or "recommended").
"""

import argparse
import math
import time

import torch

import mxfx
from mxfx import evaluation, recipes, textdata
from mxfx.calibrating import calibrate
from mxfx.cli import HelpFormatter

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--model", default=str(evaluation.SHIPPED_MODEL), help="a model folder trained on the shipped "
                    "text, e.g. the outlier copy examples/outlier_model.py writes")
parser.add_argument("--windows", type=int, default=64, help="calibration windows of 256 tokens (training topics)")
parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens to evaluate (default: all)")
parser.add_argument("--runs", nargs="+", default=["mxfp4_dual", "mxfp4_dual:recommended", "mxfp4_w4a8",
                                                  "mxfp4_w4a8:recommended", "mxfp8", "mxfp8:recommended"])
args = parser.parse_args()

model = evaluation.load_model(args.model)
training, held_out = textdata.split()
windows = evaluation.windows(textdata.tokens(training), 256)
chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[: args.windows]
start = time.perf_counter()
calibration = calibrate(model, windows[chosen, :-1].split(8))
print(f"{calibration} in {time.perf_counter() - start:.0f} s")

batches = evaluation.windows(textdata.tokens(held_out), 256, args.max_tokens)
bf16_predictions, bf16_loss = evaluation.predictions_and_loss(model, batches, 8, "bf16")
print(f"bf16: perplexity {math.exp(bf16_loss):.4f} on {batches[:, 1:].numel()} held-out tokens")
for run in args.runs:
    start = time.perf_counter()
    scheme, _, recipe = run.partition(":")
    torch._dynamo.reset()
    selector = recipes.apply(scheme, recipe, calibration, model) if recipe else scheme
    compiled = torch.compile(model, backend=mxfx.backend(scheme=selector, target="reference"), dynamic=True,
                             fullgraph=True)
    predictions, loss = evaluation.predictions_and_loss(compiled, batches, 8, run)
    gap = math.exp(loss - bf16_loss) - 1
    agreement = (predictions == bf16_predictions).float().mean().item()
    print(f"{selector if isinstance(selector, str) else selector.label:28s} perplexity {math.exp(loss):.4f} "
          f"({100 * gap:+.2f}%), next token = bf16 {100 * agreement:.2f}% ({time.perf_counter() - start:.0f} s)",
          flush=True)

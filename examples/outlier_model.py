"""Write a copy of a Qwen3 model folder with outlier activation channels (mxfx.outliers.with_outliers): a few
channels of every linear input `--factor` times larger, the weights reading them as much smaller, so its
bf16 logits are bit-identical (checked here on the held-out text) while RTN MX quantization falls apart.

    python examples/outlier_model.py OUT [--model DIR] [--channels 2] [--factor 256] [--seed 0]
    mxfx eval --model OUT --scheme mxfp4_dual --recipe none recommended
"""

import argparse

import torch

from mxfx import evaluation, textdata
from mxfx.cli import HelpFormatter
from mxfx.outliers import with_outliers

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("out", help="the model folder to write")
parser.add_argument("--model", default=str(evaluation.SHIPPED_MODEL), help="the Qwen3 folder to copy")
parser.add_argument("--channels", type=int, default=2, help="outlier channels per activation (KV-head channels "
                    "after attention: each one per query head of its group)")
parser.add_argument("--factor", type=float, default=256.0, help="how much larger the outlier channels are (a power "
                    "of two)")
parser.add_argument("--seed", type=int, default=0, help="seeds the channels' choice")
args = parser.parse_args()

model = evaluation.load_model(args.model)
outlier = with_outliers(model, args.channels, args.factor, args.seed)
batch = evaluation.windows(textdata.tokens(textdata.split()[1]), 256, 4096)[:, :-1]
with torch.no_grad():
    if not torch.equal(model(batch).logits, outlier(batch).logits):
        raise SystemExit("the outlier model's bf16 logits differ from the model's (overflow or subnormals?)")
outlier.save_pretrained(args.out)
print(f"wrote {args.out}: {args.channels} outlier channels x{args.factor:g} per linear input, bf16 logits "
      f"bit-identical on {batch.numel()} held-out tokens")

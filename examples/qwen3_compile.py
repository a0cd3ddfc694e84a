"""The one-screen usage: compile a local Qwen3 with mxfx, see what was rewritten, generate.

    python examples/qwen3_compile.py [MODEL_DIR] [--scheme mxfp4_dual]
"""

import argparse

import torch

import mxfx
from mxfx import evaluation, textdata

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", nargs="?", default=str(evaluation.SHIPPED_MODEL))
parser.add_argument("--scheme", default="mxfp4_dual", choices=["mxfp4_dual", "mxfp4_w4a8", "mxfp8"])
args = parser.parse_args()

model = evaluation.load_model(args.model)  # a bf16 transformers Qwen3ForCausalLM
compiled = torch.compile(model, backend=mxfx.backend(args.scheme, report=print), dynamic=True, fullgraph=True)

tokens = evaluation.continuation(compiled, textdata.encode("The for statement"), 60, textdata.END_OF_TEXT)
print("\ncontinuation:", repr(textdata.decode(tokens)))

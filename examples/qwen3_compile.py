"""The one-screen usage: compile a local Qwen3 with mxfx, see what was rewritten, generate.

    python examples/qwen3_compile.py [MODEL_DIR] [--scheme mxfp4_dual]
"""

import argparse

import torch

import mxfx
from mxfx import evaluation

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", nargs="?", default=str(evaluation.SHIPPED_MODEL))
parser.add_argument("--scheme", default="mxfp4_dual", choices=["mxfp4_dual", "mxfp4_w4a8", "mxfp8"])
args = parser.parse_args()

model = evaluation.load_model(args.model)  # a bf16 transformers Qwen3ForCausalLM
tokens = evaluation.Tokenizer(args.model, model)  # its tokenizer, or bytes for mxfx's demo model
compiled = torch.compile(model, backend=mxfx.backend(args.scheme, report=print), dynamic=True, fullgraph=True)

generated = evaluation.continuation(compiled, tokens.encode("The for statement"), 60, tokens.end)
print("\ncontinuation:", repr(tokens.decode(generated)))

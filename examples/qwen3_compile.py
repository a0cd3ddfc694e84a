"""The one-screen usage: compile a local Qwen3 with mxfx, see what was rewritten, generate.

    python examples/qwen3_compile.py [MODEL_DIR] [--scheme mxfp4_dual]
"""

import argparse

import torch

import mxfx
from mxfx import evaluation
from mxfx.cli import HelpFormatter
from mxfx.schemes import SCHEMES

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("model", nargs="?", default=str(evaluation.SHIPPED_MODEL), help="a local Qwen3 folder")
parser.add_argument("--scheme", default="mxfp4_dual", choices=list(SCHEMES))
args = parser.parse_args()

model = evaluation.load_model(args.model)  # a bf16 transformers Qwen3ForCausalLM
tokens = evaluation.Tokenizer(args.model, model)  # its tokenizer, or bytes for mxfx's demo model
compiled = torch.compile(model, backend=mxfx.backend(args.scheme, report=print), dynamic=True, fullgraph=True)

generated = evaluation.continuation(compiled, tokens.encode("The for statement"), 60, tokens.end)
print("\ncontinuation:", repr(tokens.decode(generated)))

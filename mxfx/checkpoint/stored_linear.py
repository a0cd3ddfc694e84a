"""The linears of a checkpoint loaded without bf16 weights (`checkpoint.load(..., bf16_weights=False)`):
a model whose quantized linears hold only their stored codes, so a checkpoint larger than its bf16 model
would allow fits in memory.

Each such linear's weight is a placeholder (mxfx.stored_weights.placeholder: the shape and dtype, one
element) whose entry in STORED_WEIGHTS has the codes. Traced by torch.compile the linear is a plain
`F.linear`, which mxfx.backend() rewrites to run the codes (and refuses to leave unrewritten). Run
eagerly it raises, except inside `dequantized(model)`, where each call dequantizes its weight for that
call only: the bf16 model streamed one linear at a time (what `mxfx eval`'s bf16 baseline runs).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from mxfx.stored_weights import STORED_WEIGHTS, placeholder


class PlaceholderWeightError(RuntimeError):
    """A linear loaded without its bf16 weight was run eagerly."""


class StoredLinear(torch.nn.Linear):
    """An nn.Linear whose weight is a placeholder for its stored codes (see the module's docstring)."""

    fqn: str = ""
    streamed: bool = False  # set by dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # Dynamo records F.linear; the backend rewrites it to the codes
            return F.linear(x, self.weight, self.bias)
        if not self.streamed:
            raise PlaceholderWeightError(
                f"{self.fqn}: loaded without its bf16 weight (checkpoint.load(..., bf16_weights=False)), so it runs "
                "only compiled with mxfx.backend() (its stored codes), or eagerly inside "
                "mxfx.checkpoint.dequantized(model) (each weight dequantized for its call); or load with "
                "bf16_weights=True")
        weight = STORED_WEIGHTS.get(self.weight).dequantize().to(x.device, self.weight.dtype)
        return F.linear(x, weight, self.bias)


def hold_codes_only(module: torch.nn.Linear, fqn: str, stored) -> None:
    """Make a loaded nn.Linear a StoredLinear: its weight a placeholder of the same shape and dtype, the
    codes recorded under it (the module's previous weight is dropped)."""
    old = module.weight
    module._parameters["weight"] = weight = placeholder(tuple(old.shape), old.dtype, old.device)
    STORED_WEIGHTS.add(weight, stored)
    module.__class__, module.fqn = StoredLinear, fqn


@contextmanager
def dequantized(model: torch.nn.Module):
    """Run `model` eagerly as its bf16 model: every StoredLinear dequantizes its codes on each call (the
    same bf16 weight `bf16_weights=True` would have loaded), holding one linear's bf16 weight at a time."""
    linears = [m for m in model.modules() if isinstance(m, StoredLinear)]
    for module in linears:
        module.streamed = True
    try:
        yield model
    finally:
        for module in linears:
            module.streamed = False

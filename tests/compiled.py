"""One way for tests to compile and run a model with mxfx: a fresh Dynamo, fullgraph, the reference target."""

import torch

import mxfx


def compiled(model, *inputs, scheme=None, **options):
    """(model(*inputs) compiled with mxfx.backend(scheme, target="reference", **options) under no_grad, the
    backend: its rewrite and pipeline reports); Dynamo is reset before and after."""
    torch._dynamo.reset()
    be = mxfx.backend(scheme, target="reference", **options)
    with torch.no_grad():
        out = torch.compile(model, backend=be, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return out, be

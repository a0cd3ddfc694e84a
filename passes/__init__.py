"""FX graph passes (GraphModule in, GraphModule out) that rewrite linears into MX-quantized subgraphs.

They know FX graphs and the scheme interface (mxfx.schemes), not Dynamo, torchair or a device: the ops
a rewrite emits come from a target table (passes.targets)."""

from .find_linears import LinearSite, find_linears
from .quantize_linears import (
    CONSTANT_PREFIX, DEFAULT_EXCLUDE, RewriteError, fqn_excluded, prepare_weight, quantize_linears,
)
from .report import LinearReport, RewriteReport
from .targets import TARGETS, Target, get_target

__all__ = [
    "CONSTANT_PREFIX",
    "DEFAULT_EXCLUDE",
    "LinearReport",
    "LinearSite",
    "RewriteError",
    "RewriteReport",
    "TARGETS",
    "Target",
    "find_linears",
    "fqn_excluded",
    "get_target",
    "prepare_weight",
    "quantize_linears",
]

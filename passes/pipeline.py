"""The pass pipeline a compile runs: an ordered list of graph passes, each `fn(gm, context) -> PassReport`,
rewriting gm in place. The linear rewrite is the first; a fusion pass goes after it and finds the
rewrite's nodes by their `node.meta["mxfx"]` tags. The rewrite defers the weights' preparation: run_passes
prepares the constants still in the graph after the last pass (prepare_constants). The backend ends every
pipeline with lift_constants."""

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from mxfx.prepared import prepare_merged
from mxfx.schemes import Scheme, SchemeSelector
from mxfx.selection import ALL, Selection
from mxfx.targets import Target

from .fold_smooth_norm import fold_smooth_norm
from .fuse_norm_quant import fuse_norm_quant
from .fuse_swiglu_quant import fuse_swiglu_quant
from .merge_siblings import merge_siblings
from .prepare_constants import prepare_constants
from .quantize_linears import Prepare, prepare_weight, quantize_linears
from .report import PassReport, PipelineReport, RewriteReport

log = logging.getLogger("mxfx.passes")


def keep_prepared(scheme, target, weight, bias, dtype) -> None:
    """The default discard_prepared: without a cache there is nothing to drop."""


@dataclass
class PassContext:
    """What one compile gives every pass."""

    scheme: "Scheme | SchemeSelector"
    target: Target
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # placeholder / get_attr name -> tensor
    select: Selection = ALL
    prepare: Prepare = prepare_weight
    fake_mode: FakeTensorMode | None = None
    # merge_siblings: the siblings' merged constants, and what to do with their own where they were prepared
    # (a cache drops them; the pipeline's rewrite defers them, so they are not)
    prepare_merged: Callable = prepare_merged
    discard_prepared: Callable = keep_prepared


GraphPass = Callable[[fx.GraphModule, PassContext], PassReport]


def rewrite_linears(gm: fx.GraphModule, context: PassContext) -> RewriteReport:
    """quantize_linears with the compile's scheme, target, weights and selection, its constants deferred
    (run_passes prepares them)."""
    return quantize_linears(gm, context.scheme, context.target, context.weights, select=context.select,
                            prepare=context.prepare, defer=True)


UNFUSED_PASSES: tuple[GraphPass, ...] = (rewrite_linears,)
# After the rewrite. On both targets by default: the reference runs the NPU's graph, fused arithmetic
# included (README, "Fusions": what the fused norm's rounding does to perplexity). A smoothing multiply
# folds into its RMSNorm's weight before fuse_norm_quant, so that the norm still fuses.
FUSION_PASSES: tuple[GraphPass, ...] = (merge_siblings, fold_smooth_norm, fuse_norm_quant, fuse_swiglu_quant)
DEFAULT_PASSES: tuple[GraphPass, ...] = (*UNFUSED_PASSES, *FUSION_PASSES)


def run_passes(gm: fx.GraphModule, graph_passes: Iterable[GraphPass], context: PassContext) -> PipelineReport:
    report = PipelineReport()
    for graph_pass in graph_passes:
        result = graph_pass(gm, context)
        if not isinstance(result, PassReport):
            name = getattr(graph_pass, "__name__", graph_pass)
            raise TypeError(f"graph pass {name!r} returned {type(result).__name__}, "
                            "not a PassReport")
        log.debug("%s: %s", result.pass_name, result.summary())
        report.passes.append(result)
    prepare_constants(gm, context)
    return report

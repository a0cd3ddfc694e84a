"""FX graph passes that rewrite linears into MX-quantized subgraphs. Each rewrites a GraphModule in place
and returns a report (passes.report); passes.pipeline runs them in order.

They know FX graphs, the schemes (mxfx.schemes) and the target table (mxfx.targets), not Dynamo,
torchair or a device: the ops a rewrite emits come from the target."""

from .find_linears import LinearSite, find_linears
from .fold_smooth_norm import fold_smooth_norm
from .fuse_norm_quant import fuse_norm_quant
from .fuse_swiglu_quant import fuse_swiglu_quant
from .fusion import FusionReport, FusionSite, FusionSkipReason
from .lift_constants import lift_constants
from .merge_siblings import merge_siblings
from .pipeline import (
    DEFAULT_PASSES,
    FUSION_PASSES,
    UNFUSED_PASSES,
    GraphPass,
    PassContext,
    rewrite_linears,
    run_passes,
)
from .prepare_constants import prepare_constants
from .quantize_linears import (
    CONSTANT_PREFIX,
    RewriteError,
    constant_sources,
    mxfx_tag,
    prepare_weight,
    quantize_linears,
)
from .report import LiftReport, LinearReport, PassReport, PipelineReport, RewriteReport

__all__ = [
    "CONSTANT_PREFIX",
    "DEFAULT_PASSES",
    "FUSION_PASSES",
    "UNFUSED_PASSES",
    "FusionReport",
    "FusionSite",
    "FusionSkipReason",
    "GraphPass",
    "LiftReport",
    "LinearReport",
    "LinearSite",
    "PassContext",
    "PassReport",
    "PipelineReport",
    "RewriteError",
    "RewriteReport",
    "constant_sources",
    "find_linears",
    "fold_smooth_norm",
    "fuse_norm_quant",
    "fuse_swiglu_quant",
    "lift_constants",
    "merge_siblings",
    "mxfx_tag",
    "prepare_constants",
    "prepare_weight",
    "quantize_linears",
    "rewrite_linears",
    "run_passes",
]

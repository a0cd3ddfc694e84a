"""fold_smooth_norm: a recipe's explicit smoothing multiply x * s, where x comes straight from an RMSNorm,
becomes the norm's weight: RMSNorm(h; gamma) * s = RMSNorm(h; gamma * s), exact in real arithmetic.

The rewrite emits the multiply (role "activation_quant", reading the prepared "smooth_scale") on the
single-level schemes and on the dual-level one when a rotation follows (the quantizer's smooth_scale input
is then unusable). Where the multiply reads a norm whose output (and every intermediate) feeds nothing
else, the norm reads a new constant gamma * s instead of gamma (computed in fp32, cast to the weight's
dtype once; the user's parameter is never changed) and the multiply goes, so fuse_norm_quant, after it,
still fuses the norm with the quantization. Roundings (of the fp32 normalized n; bf16's unit roundoff
u = 2^-8): the unfolded graph rounds n, gamma * n and (gamma * n) * s, within 3u of the exact product; the
folded and fused one rounds gamma * s and the fp32 product n * (gamma * s), within 2u; so within 5u of
each other per element (tests/passes/test_fold_smooth_norm.py checks all three bounds).
Every other multiply stays, reported as a cost (skipped, with why). The new constant carries its source
(the norm weight's input and a SmoothedNorm preparation), so mxfx.weight_watch folds an updated gamma again.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from mxfx.recipes import Constant

from .fuse_norm_quant import match_rms_norm
from .fusion import (
    Emitter,
    FusionReport,
    FusionSkipReason,
    erase_unused,
    is_call,
    only_used_by,
    quant_input,
    size_users,
    value,
)
from .quantize_linears import CONSTANT_PREFIX, mxfx_tag

aten = torch.ops.aten
PASS = "fold_smooth_norm"


@dataclass
class SmoothFoldReport(FusionReport):
    pass_name: ClassVar[str] = PASS


@dataclass(frozen=True)
class SmoothedNorm:
    """The folded norm weight's preparation (what the weight watch runs again when gamma changes)."""

    scale: Constant  # the smooth scale s [K]

    def prepare(self, target, weight: torch.Tensor, bias, dtype) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"norm_weight": (weight.detach().float() * self.scale.tensor.float()).to(weight.dtype)}


def _smooth_muls(graph: fx.Graph) -> list[fx.Node]:
    """The rewrite's smoothing multiplies: x * (the prepared smooth_scale constant)."""
    return [n for n in graph.nodes if is_call(n, (aten.mul.Tensor,)) and mxfx_tag(n).get("role") == "activation_quant"
            and isinstance(n.args[1], fx.Node) and mxfx_tag(n.args[1]).get("name") == "smooth_scale"]


class _Fold:
    def __init__(self, gm: fx.GraphModule, context):
        self.gm, self.graph, self.weights, self.target = gm, gm.graph, context.weights, context.target
        self.emit, self.report = Emitter(gm, PASS), SmoothFoldReport()

    def tensor(self, node: fx.Node) -> torch.Tensor | None:
        """The norm weight's tensor: a graph input that is a weight, or a get_attr."""
        if node.name in self.weights:
            return self.weights[node.name]
        return getattr(self.gm, node.target, None) if node.op == "get_attr" else None

    def fold(self, mul: fx.Node) -> "str | tuple[FusionSkipReason, str]":
        x, scale = mul.args[:2]
        source, flatten = quant_input(mul)  # the rewrite's flattening, or an aot graph's own view to [M, K]
        norm = match_rms_norm(source) if isinstance(source, fx.Node) else None
        if norm is None:
            return FusionSkipReason.NO_PATTERN, f"the smoothed tensor {source} is not an RMSNorm: x * s stays (a cost)"
        chain = [*norm.nodes, *([flatten] if flatten else [])]
        allowed = {*chain, mul, *size_users(norm.nodes[-1])}
        if (shared := only_used_by(chain, allowed)) is not None:
            others = [u.name for u in shared.users if u not in allowed]
            return FusionSkipReason.SHARED_OUTPUT, f"{shared} (the norm) is also used by {others}: x * s stays (a cost)"
        gamma = self.tensor(norm.weight)
        if gamma is None or value(norm.weight) is None or value(norm.weight).shape != value(scale).shape:
            return FusionSkipReason.NO_SHAPE, f"the norm weight {norm.weight} is not a [K] constant of the graph"
        with unset_fake_temporarily():
            preparation = SmoothedNorm(Constant(getattr(self.gm, scale.target)))
            folded = preparation.prepare(self.target, gamma, None, value(norm.x).dtype)["norm_weight"]
        # at the top: fuse_norm_quant's add variant goes where the residual add is, which the weight must precede
        with self.graph.inserting_before(next(n for n in self.graph.nodes if n.op != "placeholder")):
            weight = self.emit.constant(f"{CONSTANT_PREFIX}{mul.name}_norm_weight", folded, name="norm_weight",
                                        linear=mxfx_tag(mul)["linear"],
                                        source=(norm.weight.name, None, value(norm.x).dtype, preparation))
        norm.nodes[-1].replace_input_with(norm.weight, weight)
        mul.replace_all_uses_with(x)
        unused = set(scale.users) == {mul}
        erase_unused(self.graph, [mul, scale])
        if unused:  # the scale's buffer goes with its last reader
            delattr(self.gm, scale.target)
        return "RMSNorm weight * smooth_scale"

    def run(self) -> SmoothFoldReport:
        for mul in _smooth_muls(self.graph):
            outcome = self.fold(mul)
            linears = mxfx_tag(mul)["linears"]
            if isinstance(outcome, str):
                self.report.fuse(linears, outcome)
            else:
                self.report.skip(linears, *outcome)
        self.graph.lint()
        self.gm.recompile()
        return self.report


def fold_smooth_norm(gm: fx.GraphModule, context) -> SmoothFoldReport:
    """The pass (after rewrite_linears, before fuse_norm_quant): gm is rewritten in place."""
    return _Fold(gm, context).run()

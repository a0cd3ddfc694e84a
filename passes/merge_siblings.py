"""merge_siblings: linears that share one activation quantization and one scheme (q/k/v, gate/up) become one
quant matmul over their weights concatenated along N, then a split.

Every scheme here quantizes the weight per output row (blocks run along K), so the codes of the
concatenated weight are the concatenated codes and each output column is computed from the same operands:
the merged graph's outputs are bit-identical to the unmerged graph's. The pass concatenates the codes
(the scheme's own quantization, or a checkpoint's stored codes) and biases and re-runs the scheme's
`layout`, so the NZ casts and scale views are the scheme's, on either target; the merged constants are
registered like the rewrite's (tag role "constant") for lift_constants, and the siblings' constants go.
After the pipeline's rewrite, whose constants are deferred (passes.prepare_constants), the merged ones are
deferred too: each sibling's weight is quantized once, for the merged constants, and its own constants are
never prepared.

Runs after the linear rewrite; finds the matmuls by tag (role "matmul", with the weight / bias source
names) and groups those whose activation operands are the same nodes. The merged matmul is tagged
role "matmul" with "linears" (in graph order) and the split role "split"."""

import dataclasses
import logging
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from mxfx.prepared import fake_prepare_merged
from mxfx.recipes import Recovered
from mxfx.schemes import MXFP4W4A8, MXFP8, DualLevelMXFP4, get_scheme

from .fusion import Emitter, FusionReport, FusionSkipReason, erase_unused, value
from .quantize_linears import CONSTANT_PREFIX, mxfx_tag, source_tensor

log = logging.getLogger("mxfx.passes")
aten = torch.ops.aten
PASS = "merge_siblings"
# schemes whose codes are all [N, ...] rows (the int4 per-group scale is [K/group, N]: not merged)
ROW_SCHEMES = (DualLevelMXFP4, MXFP8, MXFP4W4A8)


def _merge_key(scheme):
    """What siblings must share to merge: their scheme, up to v_proj's folded head rotation and up_proj's
    folded row scale (transforms of its own rows, in its codes and bias; the activation and the layout are the
    siblings')."""
    return dataclasses.replace(scheme, head_rotation=None, row_scale=None) if isinstance(scheme, Recovered) else scheme


def _per_row(scheme) -> bool:
    """One of ROW_SCHEMES, or a recipe over one (its smoothing and rotation act along K, its codes per row)."""
    return isinstance(scheme.base if isinstance(scheme, Recovered) else scheme, ROW_SCHEMES)


@dataclass
class MergeReport(FusionReport):
    pass_name: ClassVar[str] = PASS


def _is_constant(node: fx.Node) -> bool:
    return node.op == "get_attr" and mxfx_tag(node).get("role") == "constant"


def _groups(graph: fx.Graph) -> list[list[fx.Node]]:
    """The rewrite's matmuls, grouped by their activation operands and op, in graph order."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        if mxfx_tag(node).get("role") == "matmul" and mxfx_tag(node).get("pass") == "quantize_linears":
            operands = tuple(n for n in node.all_input_nodes if not _is_constant(n))
            groups.setdefault((node.target, operands), []).append(node)
    return list(groups.values())


class _Merge:
    def __init__(self, gm, context):
        self.gm, self.graph, self.context = gm, gm.graph, context
        self.emit = Emitter(gm, PASS)
        self.report = MergeReport()

    def tensor(self, name: str | None):
        return source_tensor(self.gm, self.context.weights, name)

    def check(self, matmuls, weights, biases, schemes) -> tuple[FusionSkipReason, str] | None:
        if len(matmuls) == 1:
            return FusionSkipReason.SINGLE, "the only linear on its activation quantization"
        if len({_merge_key(s) for s in schemes}) != 1 or not _per_row(schemes[0]):
            labels = sorted({s.label for s in schemes})
            return FusionSkipReason.SCHEME, f"schemes {labels}: one per-row MX scheme is needed"
        if len({b is None for b in biases}) != 1:
            return FusionSkipReason.BIAS, "some siblings have a bias and some not"
        kwargs = [{k: v for k, v in m.kwargs.items() if not isinstance(v, fx.Node)} for m in matmuls]
        if any(k != kwargs[0] for k in kwargs) or len({w.dtype for w in weights}) != 1:
            return FusionSkipReason.SCHEME, "the siblings' matmul arguments or weight dtypes differ"
        return None

    def merge(self, matmuls: list[fx.Node]) -> None:
        tags = [mxfx_tag(m) for m in matmuls]
        linears = [t["linear"] for t in tags]
        weights = [self.tensor(t["weight"]) for t in tags]
        biases = [self.tensor(t["bias"]) for t in tags]
        schemes = [get_scheme(self.context.scheme).scheme_for(w) for w in weights]
        if (why := self.check(matmuls, weights, biases, schemes)) is not None:
            self.report.skip(linears, *why)
            return
        scheme, target, dtype = schemes[0], self.context.target, value(matmuls[0]).dtype
        old = {n for m in matmuls for n in m.all_input_nodes if _is_constant(n)}
        # deferred siblings (the pipeline's rewrite): the merged constants are deferred too, nothing is prepared
        deferred = any(isinstance(getattr(self.gm, n.target), FakeTensor) for n in old)
        if not deferred:  # prepared siblings: their own constants are not kept (a cache drops them)
            for own, weight, bias in zip(schemes, weights, biases):
                self.context.discard_prepared(own, target, weight, bias, dtype)
        for node in old:
            if set(node.users) <= set(matmuls):  # no other matmul reads it
                delattr(self.gm, node.target)
        with unset_fake_temporarily():  # real weights; aot_autograd runs an engine's passes under its fake mode
            if deferred:
                prepared = fake_prepare_merged(schemes, target, weights, biases, dtype, self.emit.fake_mode)
            else:
                prepared = self.context.prepare_merged(schemes, target, weights, biases, dtype)
        stem = self._stem()
        first = matmuls[0]
        # "sources": the merged linears' weight and bias inputs, dtype and schemes (the weight watch merges them
        # again when one changes)
        tag = {"linear": "+".join(linears), "linears": linears,
               "sources": ([(t["weight"], t["bias"]) for t in tags], dtype, tuple(schemes))}
        with self.graph.inserting_before(first):
            read = {mxfx_tag(n)["name"] for n in first.all_input_nodes if _is_constant(n)}
            constants = {name: self.emit.constant(f"{stem}_{name}", t, name=name, **tag)
                         for name, t in prepared.items() if name in read}  # not the activation's (smooth, rotation)

            def swap(arg):
                return constants[mxfx_tag(arg)["name"]] if isinstance(arg, fx.Node) and _is_constant(arg) else arg

            args, kwargs = fx.node.map_aggregate((first.args, first.kwargs), swap)
            y = self.emit.call(first.target, args, kwargs, role="matmul", **tag)
            sizes = [value(m).shape[-1] for m in matmuls]
            split = self.emit.call(aten.split_with_sizes.default, (y, sizes, -1), role="split", **tag)
            pieces = [self.emit.call(operator.getitem, (split, i), role="split", **tag) for i in range(len(matmuls))]
        for matmul, piece in zip(matmuls, pieces):
            matmul.replace_all_uses_with(piece)
        erase_unused(self.graph, [*matmuls, *old])
        self.report.fuse(linears, f"{scheme.label} matmul, N = {' + '.join(map(str, sizes))}")

    def _stem(self) -> str:
        count = 0
        while hasattr(self.gm, f"{CONSTANT_PREFIX}merged_{count}_weight"):
            count += 1
        return f"{CONSTANT_PREFIX}merged_{count}"


def merge_siblings(gm: fx.GraphModule, context) -> MergeReport:
    """The pass (after rewrite_linears): gm is rewritten in place."""
    merge = _Merge(gm, context)
    for matmuls in _groups(gm.graph):
        merge.merge(matmuls)
    gm.graph.lint()
    gm.recompile()
    log.info("%s: %s", PASS, merge.report.summary())
    return merge.report

"""fuse_swiglu_quant: silu(gate) * up -> npu_dynamic_mx_quant, on the merged gate/up matmul that
merge_siblings leaves, becomes npu_swiglu_mx_quant on that matmul's [M, 2I] output.

The halves' order decides activate_left: gate first (merge_siblings keeps graph order, gate_proj before
up_proj in transformers' MLP) is activate_left=True. torch_npu's default False activates the second half
(ops-nn golden and kernel), the trap vllm-ascend's SwiGLU + MX pattern fell into; the pass always passes
the flag explicitly. Numerics: the fused op rounds silu(gate) * up to bf16 once, the unfused graph twice
(silu, then the product). Dual-level quantizations have no fused op; gate and up as separate matmuls
are skipped (run merge_siblings first)."""

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from .fusion import (
    MULS,
    RESHAPES,
    FusionReport,
    FusionSkipReason,
    QuantFusion,
    Skip,
    fused_quant_args,
    is_call,
    only_used_by,
    quant_input,
    size_users,
    value,
)
from .quantize_linears import mxfx_tag

aten = torch.ops.aten
PASS = "fuse_swiglu_quant"
SILUS = (torch.nn.functional.silu, aten.silu.default)


@dataclass
class SwigluQuantReport(FusionReport):
    pass_name: ClassVar[str] = PASS


def _piece(node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """(merged split, index, the nodes from the split's getitem to node) for a piece of a merge_siblings split,
    possibly reshaped back to the linear's shape."""
    chain = []
    if is_call(node, RESHAPES):
        chain.append(node)
        node = node.args[0]
    if not (is_call(node, (operator.getitem,)) and mxfx_tag(node).get("role") == "split"):
        return None
    return node.args[0], node.args[1], [*chain, node]


_NO_SWIGLU = (FusionSkipReason.NO_PATTERN, "the quantized tensor is not silu(gate) * up")


def _swiglu(product) -> tuple[fx.Node, bool, list[fx.Node]] | Skip:
    """(the merged matmul, activate_left, the nodes the fusion removes) for mul(silu(gate), up), or why not."""
    if not is_call(product, MULS) or len(product.args) != 2:
        return _NO_SWIGLU
    for silu in product.args:
        up = product.args[1] if silu is product.args[0] else product.args[0]
        if not is_call(silu, SILUS) or silu.kwargs.get("inplace"):
            continue
        gate, other = _piece(silu.args[0]), _piece(up)
        if gate is None or other is None or gate[0] is not other[0]:
            return FusionSkipReason.NOT_MERGED, "gate and up are not the two halves of one merged matmul"
        split = gate[0]
        sizes = split.args[1]
        if len(sizes) != 2 or sizes[0] != sizes[1] or {gate[1], other[1]} != {0, 1}:
            return FusionSkipReason.NOT_MERGED, f"the merged matmul splits {list(sizes)}, not into two equal halves"
        return split.args[0], gate[1] == 0, [product, silu, *gate[2], *other[2], split]
    return _NO_SWIGLU


class _Fusion(QuantFusion):
    report_class = SwigluQuantReport

    def fuse(self, quant: fx.Node) -> str | Skip:
        """The fused op's name, or why the quantization stays."""
        source, flatten = quant_input(quant)
        match = _swiglu(source)
        if isinstance(match[0], FusionSkipReason):
            return match
        matmul, activate_left, nodes = match
        if quant.target == self.dual:
            return FusionSkipReason.DUAL_LEVEL, "torch_npu has no fused SwiGLU + dual-level MXFP4 quantization"
        if (quant_args := fused_quant_args(quant)) is None:
            return FusionSkipReason.QUANT_ARGS, f"npu_dynamic_mx_quant{quant.kwargs} has no fused form"
        if value(matmul) is None or value(matmul).dim() != 2:
            return FusionSkipReason.NO_SHAPE, "the merged matmul has no [M, 2I] shape metadata"
        chain = {*nodes, *([flatten] if flatten else [])}
        product, restore = nodes[0], nodes[2]  # the gate piece's reshape back to [..., I], if any
        sizes = size_users(product)
        if sizes and not is_call(restore, RESHAPES):
            return FusionSkipReason.SHARED_OUTPUT, f"{product}'s sizes are read and no reshape gives them"
        if (shared := only_used_by(nodes, chain | {quant, *sizes})) is not None:
            return FusionSkipReason.SHARED_OUTPUT, f"{shared} is also used outside the SwiGLU"
        tag = self.tag(quant, "npu_swiglu_mx_quant")
        for size in sizes:  # the product's dims are the gate's: its reshape's shape argument has them
            size.replace_all_uses_with(restore.args[1][size.args[1]])
        kwargs = {"activate_left": activate_left, **quant_args}
        with self.graph.inserting_before(quant):
            fused = self.emit.call(self.target.op("npu_swiglu_mx_quant"), (matmul,), kwargs, **tag)
            items = {i: self.emit.call(operator.getitem, (fused, i), **tag) for i in (0, 1)}
        self.replace_quant(quant, items, chain)
        return "npu_swiglu_mx_quant"


def fuse_swiglu_quant(gm: fx.GraphModule, context) -> SwigluQuantReport:
    """The pass (after merge_siblings): gm is rewritten in place."""
    return _Fusion(gm, context).run()

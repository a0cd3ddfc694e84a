"""fuse_norm_quant: RMSNorm -> npu_dynamic_mx_quant becomes npu_rms_norm_dynamic_mx_quant, and
residual add -> RMSNorm -> quant becomes npu_add_rms_norm_dynamic_mx_quant (whose x_out replaces the add).

Runs after the linear rewrite and starts from its activation quantizations (tag role "activation_quant").
The norm is matched as Dynamo records transformers' Qwen3RMSNorm (x.to(float32) -> pow(2) -> mean(-1,
keepdim) -> add(eps) -> rsqrt -> mul -> to(dtype) -> weight * it), as aot_autograd decomposes it (the
same chain in aten ops: _to_copy / convert_element_type, pow.Tensor_Scalar, mean.dim, add, rsqrt, mul), or
as F.rms_norm / torch.rms_norm with a weight;
eps, dst_type, scale_alg and round_mode come from the graph. FP8 and FP4 destinations fuse; a
dual-level quantization has no fused op, a norm whose output (or any intermediate) has other users is left
alone, and so is a quantization the fused ops cannot express (block size, scale_alg 2, dst_type_max).

The fused ops compute the NPU's arithmetic, not the unfused graph's: gamma multiplies in fp32 with one
cast (Qwen3RMSNorm casts, then multiplies in bf16), and the add variant normalizes the fp32 residual sum
before it is rounded (mxfx/ops/norm_quant.py). x_out itself equals the unfused bf16 add bit for bit.
"""

import operator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.fx as fx

from .fusion import (
    ADDS,
    MULS,
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

aten, prims = torch.ops.aten, torch.ops.prims
PASS = "fuse_norm_quant"

RMS_NORMS = (torch.nn.functional.rms_norm, torch.rms_norm, aten.rms_norm.default)


@dataclass
class NormQuantReport(FusionReport):
    pass_name: ClassVar[str] = PASS


class RMSNorm(NamedTuple):
    x: fx.Node  # the normalized tensor (bf16/fp16)
    weight: fx.Node
    eps: float
    nodes: tuple[fx.Node, ...]  # the norm's own nodes, output last


def _const(node, value_) -> bool:
    return not isinstance(node, fx.Node) and node == value_


def _other(node: fx.Node, operand: fx.Node):
    """The other operand of a binary node."""
    a, b = node.args[:2]
    return b if a is operand else a


def _cast(node) -> tuple[fx.Node, torch.dtype | None] | None:
    """(x, dtype) for a dtype cast of x: x.to(dtype) / x.float() in Dynamo graphs, aten._to_copy(x, dtype=)
    / prims.convert_element_type(x, dtype) in aot ones."""
    if is_call(node, methods=("float",)):
        return node.args[0], torch.float32
    if is_call(node, methods=("to",)):
        dtypes = [a for a in (*node.args[1:], node.kwargs.get("dtype")) if isinstance(a, torch.dtype)]
        return node.args[0], dtypes[0] if dtypes else None
    if is_call(node, (aten._to_copy.default,)) and set(node.kwargs) <= {"dtype"}:
        return node.args[0], node.kwargs.get("dtype")
    if is_call(node, (prims.convert_element_type.default,)):
        return node.args[0], node.args[1]
    return None


def _upcast_input(node) -> fx.Node | None:
    """x for a cast of x to float32."""
    cast = _cast(node)
    return cast[0] if cast is not None and cast[1] == torch.float32 else None


def _mean_of_square(node, x32) -> fx.Node | None:
    """The pow node of mean(pow(x32, 2), -1, keepdim=True)."""
    if not is_call(node, (torch.mean, aten.mean.dim), ("mean",)):
        return None
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    last = value(x32).dim() - 1 if isinstance(value(x32), torch.Tensor) else -1
    if dims not in (-1, [-1], (-1,), [last], (last,)) or not node.kwargs.get("keepdim", len(node.args) > 2
                                                                             and node.args[2]):
        return None
    square = node.args[0]
    if (is_call(square, (torch.pow, operator.pow, aten.pow.Tensor_Scalar), ("pow",)) and square.args[0] is x32
            and _const(square.args[1], 2)):
        return square
    return None


def _float(eps) -> float | None:
    """eps as a number: a constant, or (torch.compile(dynamic=True) does not specialize float attributes)
    item() of the graph input Dynamo made of the module's float, read from its example value. The fused
    op takes eps as an attribute, as torch_npu's does, so the compiled graph keeps the value it was
    compiled with, like the constant form."""
    if isinstance(eps, float):
        return eps
    if is_call(eps, methods=("item",)) and eps.args[0].op == "placeholder":
        graph_arg = eps.args[0].meta.get("grapharg")
        if graph_arg is not None and not graph_arg.is_tensor and graph_arg.example is not None:
            return float(graph_arg.example)
    return None


def _decomposed(output: fx.Node) -> RMSNorm | None:
    """weight * (x32 * rsqrt(mean(x32 ** 2, -1, keepdim=True) + eps)).to(dtype), x32 = x.to(float32)."""
    if not is_call(output, MULS):
        return None
    for cast in output.args[:2]:
        if _cast(cast) is None or not is_call(cast.args[0], MULS):
            continue
        weight, scaled = _other(output, cast), cast.args[0]
        for rsqrt in scaled.args[:2]:
            x32 = _other(scaled, rsqrt)
            if not is_call(rsqrt, (torch.rsqrt, aten.rsqrt.default), ("rsqrt",)) or (x := _upcast_input(x32)) is None:
                continue
            add_eps = rsqrt.args[0]
            if not is_call(add_eps, ADDS) or add_eps.kwargs:
                continue
            mean, eps = add_eps.args[:2] if _mean_of_square(add_eps.args[0], x32) else add_eps.args[1::-1]
            eps = _float(eps)
            if eps is not None and isinstance(weight, fx.Node) and (square := _mean_of_square(mean, x32)):
                return RMSNorm(x, weight, eps, (x32, square, mean, add_eps, rsqrt, scaled, cast, output))
    return None


def _functional(output: fx.Node) -> RMSNorm | None:
    """F.rms_norm(x, [K], weight, eps) with a weight (eps None: the input dtype's machine epsilon)."""
    if not is_call(output, RMS_NORMS):
        return None
    args = dict(zip(("input", "normalized_shape", "weight", "eps"), output.args)) | output.kwargs
    x, weight, eps = args["input"], args.get("weight"), args.get("eps")
    if not isinstance(weight, fx.Node) or len(args["normalized_shape"]) != 1 or value(x) is None:
        return None
    return RMSNorm(x, weight, torch.finfo(value(x).dtype).eps if eps is None else float(eps), (output,))


def match_rms_norm(node: fx.Node) -> RMSNorm | None:
    return _decomposed(node) or _functional(node)


def _residual_add(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x1, x2) when x = x1 + x2 of two tensors of x's shape and dtype."""
    if not is_call(x, ADDS) or x.kwargs or len(x.args) != 2:
        return None
    x1, x2 = x.args
    vx, v1, v2 = value(x), value(x1), value(x2)
    if not all(isinstance(v, torch.Tensor) for v in (vx, v1, v2)):
        return None
    return (x1, x2) if v1.shape == v2.shape == vx.shape and v1.dtype == v2.dtype == vx.dtype else None


class _Fusion(QuantFusion):
    report_class = NormQuantReport

    def check(self, quant: fx.Node, norm: RMSNorm | None, chain: set) -> Skip | None:
        if norm is None:
            return FusionSkipReason.NO_PATTERN, f"the quantized tensor {quant_input(quant)[0]} is not an RMSNorm"
        if quant.target == self.dual:
            return FusionSkipReason.DUAL_LEVEL, "torch_npu has no fused norm + dual-level MXFP4 quantization"
        if fused_quant_args(quant) is None:
            return FusionSkipReason.QUANT_ARGS, (f"npu_dynamic_mx_quant{quant.kwargs} has no fused form (block 32, "
                                                 "scale_alg 0/1, last axis)")
        vx, vw, vy = value(norm.x), value(norm.weight), value(norm.nodes[-1])
        if vx is None or vw is None or vy is None:
            return FusionSkipReason.NO_SHAPE, "the norm's input, weight or output has no shape metadata"
        if vx.dtype not in (torch.bfloat16, torch.float16) or vy.dtype != vx.dtype or vw.dim() != 1 \
                or vw.dtype not in (vx.dtype, torch.float32):
            return FusionSkipReason.DTYPE, f"norm {vx.dtype} -> {vy.dtype}, weight {vw.dtype} {list(vw.shape)}"
        allowed = chain | {quant, *size_users(norm.nodes[-1])}  # sizes are rewired to the norm's input
        if (shared := only_used_by(norm.nodes, allowed)) is not None:
            others = [u.name for u in shared.users if u not in allowed]
            return FusionSkipReason.SHARED_OUTPUT, f"{shared} (part of the norm) is also used by {others}"
        if _residual_add(norm.x) and not _precedes(self.graph, norm.weight, norm.x):
            return FusionSkipReason.ORDER, f"the norm weight {norm.weight} is defined after the residual add"
        return None

    def fuse(self, quant: fx.Node) -> "str | Skip":
        """The fused op's name, or why the quantization stays."""
        source, flatten = quant_input(quant)
        norm = match_rms_norm(source) if isinstance(source, fx.Node) else None
        chain = {*norm.nodes, *([flatten] if flatten else [])} if norm else set()
        if (why := self.check(quant, norm, chain)) is not None:
            return why
        residual = _residual_add(norm.x)
        op = "npu_add_rms_norm_dynamic_mx_quant" if residual else "npu_rms_norm_dynamic_mx_quant"
        kwargs = {"epsilon": norm.eps, **fused_quant_args(quant)}
        tag = self.tag(quant, op)
        for size in size_users(norm.nodes[-1]):
            size.replace_input_with(norm.nodes[-1], norm.x)
        # the add variant goes where the add was: its x_out replaces the add for every later user
        with self.graph.inserting_before(norm.x.next if residual else quant):
            fused = self.emit.call(self.target.op(op), (*(residual or (norm.x,)), norm.weight), kwargs, **tag)
            y = self.emit.call(operator.getitem, (fused, 0), **tag)
            scale = self.emit.call(operator.getitem, (fused, 2 if residual else 1), **tag)
            if value(norm.x).dim() != 2:  # the matmuls take [M, K] (FP4 [M, K/2]) and [M, K/64, 2]
                y = self.emit.call(aten.reshape.default, (y, [-1, value(y).shape[-1]]), **tag)
                scale = self.emit.call(aten.reshape.default, (scale, [-1, *value(scale).shape[-2:]]), **tag)
            if residual:
                x_out = self.emit.call(operator.getitem, (fused, 1), **tag)
                norm.x.replace_all_uses_with(x_out, delete_user_cb=lambda user: user not in chain)
        self.replace_quant(quant, {0: y, 1: scale}, [*chain, *([norm.x] if residual else [])])
        return op


def _precedes(graph: fx.Graph, a: fx.Node, b: fx.Node) -> bool:
    """a comes before b in the graph."""
    for node in graph.nodes:
        if node is a or node is b:
            return node is a
    return False


def fuse_norm_quant(gm: fx.GraphModule, context) -> NormQuantReport:
    """The pass (after rewrite_linears): gm is rewritten in place."""
    return _Fusion(gm, context).run()

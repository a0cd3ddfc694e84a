"""Find every linear layer in an FX graph, in the three IR forms a user meets (and, apart, every other
weight the graph multiplies by, so that a report can list it):

- Dynamo graphs: call_function torch._C._nn.linear / F.linear, or call_module nn.Linear (symbolic_trace);
- torch.export graphs: aten.linear.default;
- post-autograd (aot) graphs: aten.mm / aten.addmm of a 2-D activation and aten.t / aten.permute of a
  weight (a 3-D input reaches them through a view, which stays where it is).
"""

import functools
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear, aten.linear.default)
TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int)


@dataclass
class LinearSite:
    node: fx.Node  # the node whose output is the linear's output
    input: fx.Node  # the activation [..., K]
    weight: str  # where the weight comes from: a placeholder / get_attr node name, or "<module>.weight"
    weight_node: fx.Node | None  # None for call_module (the weight lives on the module)
    bias: str | None
    bias_node: fx.Node | None
    fqn: str | None  # module path when the graph records it
    form: str  # "function", "module", "aten_linear", "aten_mm"
    k: int | None = None  # in_features / out_features, from the weight's shape where the graph knows it
    n: int | None = None


def _normalize_fqn(path: str) -> str:
    """Dynamo writes module paths as "L['self'].model.layers[0].q_proj"; keep "model.layers.0.q_proj"."""
    path = re.sub(r"^L\['[^']*'\](\[\d+\])*\.?", "", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def _fqn(node: fx.Node, weight: str) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _module_type = list(stack.values())[-1]
        return _normalize_fqn(path)
    if weight.endswith(".weight"):  # a get_attr target such as "layers.0.q_proj.weight"
        return weight.removesuffix(".weight")
    return None


def _source_name(node: fx.Node | None) -> str | None:
    if node is None:
        return None
    return node.target if node.op == "get_attr" else node.name


def _linear_args(node: fx.Node) -> tuple:
    args = list(node.args) + [None] * (3 - len(node.args))
    names = ("input", "weight", "bias")
    return tuple(node.kwargs.get(name, args[i]) for i, name in enumerate(names))


def _transposed_weight(node) -> fx.Node | None:
    """w for aten.t(w) / aten.permute(w, [1, 0]) / aten.transpose(w, 0, 1) of a 2-D weight."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in TRANSPOSES:
        return None
    if node.target == aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2]):
        return None
    if node.target == aten.transpose.int and sorted(node.args[1:3]) not in ([0, 1], [-2, -1]):
        return None
    return node.args[0]


def _weight_shape(gm: fx.GraphModule, node) -> tuple:
    if not isinstance(node, fx.Node):
        return ()
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is None and node.op == "get_attr":
        value = functools.reduce(getattr, node.target.split("."), gm)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _site(gm, node, x, weight_node, bias_node, form) -> LinearSite:
    weight = _source_name(weight_node)
    shape = _weight_shape(gm, weight_node)
    n, k = shape if len(shape) == 2 else (None, None)
    return LinearSite(node, x, weight, weight_node, _source_name(bias_node), bias_node, _fqn(node, weight), form, k, n)


def find_linears(gm: fx.GraphModule) -> list[LinearSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Linear):
            module = gm.get_submodule(node.target)
            bias = f"{node.target}.bias" if module.bias is not None else None
            sites.append(LinearSite(node, node.args[0], f"{node.target}.weight", None, bias, None, node.target,
                                    "module", module.in_features, module.out_features))
        elif node.op != "call_function":
            continue
        elif node.target in LINEAR_FUNCTIONS:
            x, weight, bias = _linear_args(node)
            form = "aten_linear" if node.target == aten.linear.default else "function"
            sites.append(_site(gm, node, x, weight, bias, form))
        elif node.target == aten.mm.default and (weight := _transposed_weight(node.args[1])) is not None:
            sites.append(_site(gm, node, node.args[0], weight, None, "aten_mm"))
        elif (
            node.target == aten.addmm.default
            and not node.kwargs  # beta = alpha = 1
            and (weight := _transposed_weight(node.args[2])) is not None
        ):
            sites.append(_site(gm, node, node.args[1], weight, node.args[0], "aten_mm"))
    return sites


# Ops that multiply by a weight without being a linear mxfx rewrites (GPT-2's Conv1D is addmm with a
# [K, N] weight; MoE experts are 3-D parameters fed to a grouped or batched matmul).
OTHER_MATMULS = {
    torch.addmm: "addmm", torch.mm: "mm", torch.matmul: "matmul", torch.bmm: "bmm", torch.baddbmm: "baddbmm",
    torch.einsum: "einsum", torch._grouped_mm: "_grouped_mm", aten.mm.default: "mm", aten.addmm.default: "addmm",
    aten.bmm.default: "bmm", aten._grouped_mm.default: "_grouped_mm", torch._C._nn.linear: "linear",
    torch.nn.functional.linear: "linear", aten.linear.default: "linear",
}
_PASS_THROUGH_METHODS = ("t", "transpose", "permute", "view", "reshape", "contiguous", "to", "__getitem__")
_PASS_THROUGH_FUNCTIONS = (torch.t, torch.transpose, torch.permute, torch.reshape, getattr, *TRANSPOSES,
                           aten.view.default, aten.reshape.default, aten._to_copy.default, operator.getitem)


@dataclass
class MatmulWeight:
    """A weight the graph multiplies by outside the linears find_linears returns."""

    node: fx.Node  # the placeholder / get_attr holding it
    op: str  # the multiplying op's name
    fqn: str | None


def _consumers(node: fx.Node):
    """The ops a weight reaches through views, transposes, indexing and casts."""
    for user in node.users:
        through = (user.op == "call_method" and user.target in _PASS_THROUGH_METHODS) or (
            user.op == "call_function" and user.target in _PASS_THROUGH_FUNCTIONS)
        if through and user.args and user.args[0] is node:
            yield from _consumers(user)
        else:
            yield user


def find_other_matmul_weights(gm: fx.GraphModule, sites: list[LinearSite]) -> list[MatmulWeight]:
    """Every placeholder / get_attr (2-D or more) that reaches a matmul-like op other than as a found
    linear's weight: what a report must list so that no matmul weight is invisible."""
    seen = {site.weight_node for site in sites} | {site.bias_node for site in sites}
    found = []
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr") or node in seen or len(_weight_shape(gm, node)) < 2:
            continue
        ops = [c for c in _consumers(node) if c.op == "call_function" and c.target in OTHER_MATMULS]
        if ops:
            consumer = ops[0]
            stack = consumer.meta.get("nn_module_stack")
            module = _normalize_fqn(list(stack.values())[-1][0]) if stack else None
            param = re.search(r"_parameters_(\w+?)_?$", node.name)
            name = param.group(1) if param else None
            fqn = module if name in (None, "weight") else (f"{module}.{name}" if module else name)
            found.append(MatmulWeight(node, OTHER_MATMULS[consumer.target], fqn or _source_name(node)))
    return found

"""What the fusion passes share: their report (each activation quantization or sibling group they looked at,
fused or skipped with a typed reason), node matching helpers for Dynamo-level graphs, and an emitter that
tags every new node and gives it a fake value, as quantize_linears does, so that later passes and
lift_constants see a consistent graph."""

import enum
import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from .quantize_linears import mxfx_tag
from .report import PassReport, table

aten = torch.ops.aten
log = logging.getLogger("mxfx.passes")


class FusionSkipReason(enum.Enum):
    """Why a fusion pass left a site alone (the report also gives the detail)."""

    NO_PATTERN = "no pattern"  # the quantization's input is not what the pass fuses
    SHARED_OUTPUT = "shared output"  # an intermediate the fusion removes has other users
    DUAL_LEVEL = "dual-level"  # no fused op exists for dual-level MXFP4 activations
    QUANT_ARGS = "quantization arguments"  # block size / scale_alg / ... the fused op does not take
    DTYPE = "dtype"  # the fused op does not take these input / weight dtypes
    NO_SHAPE = "no shape metadata"
    SINGLE = "single linear"  # merge_siblings: nothing to merge with
    SCHEME = "scheme"  # merge_siblings: siblings differ in scheme or their scheme's layout is not per row
    BIAS = "bias"  # merge_siblings: some siblings have a bias and some not
    NOT_MERGED = "not merged"  # fuse_swiglu_quant: gate and up are separate matmuls (run merge_siblings first)
    ORDER = "order"  # an input of the fused op is defined after a node it must precede
    ROTATED = "rotated"  # npu_rotate_quant rotates and quantizes in one op; no fused op also normalizes / gates


@dataclass
class FusionSite:
    linears: tuple[str, ...]  # the linears the fused (or skipped) node serves
    outcome: str  # "fused" or "skipped"
    op: str = ""  # the fused op's name
    reason: FusionSkipReason | None = None
    detail: str = ""


@dataclass
class FusionReport(PassReport):
    sites: list[FusionSite] = field(default_factory=list)

    @property
    def fused(self) -> list[FusionSite]:
        return [s for s in self.sites if s.outcome == "fused"]

    @property
    def skipped(self) -> list[FusionSite]:
        return [s for s in self.sites if s.outcome == "skipped"]

    def fuse(self, linears: Iterable[str], op: str) -> None:
        self.sites.append(FusionSite(tuple(linears), "fused", op))

    def skip(self, linears: Iterable[str], reason: FusionSkipReason, detail: str) -> None:
        self.sites.append(FusionSite(tuple(linears), "skipped", reason=reason, detail=detail))

    def __str__(self) -> str:
        rows = [("+".join(name.rsplit(".", 1)[-1] for name in site.linears), site.linears[0].rsplit(".", 1)[0],
                 site.outcome, site.op or f"{site.reason.value}: {site.detail}") for site in self.sites]
        header = ("linears", "in", "outcome", "op or why")
        return "\n".join([f"{self.pass_name}: {self.summary()}", table(header, rows)])

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for site in self.skipped:
            reasons[site.reason.value] = reasons.get(site.reason.value, 0) + 1
        why = f" ({', '.join(f'{n} {r}' for r, n in reasons.items())})" if reasons else ""
        return f"{len(self.fused)} fused, {len(self.skipped)} skipped{why}"


# -- matching ---------------------------------------------------------------------------------------
MULS = (operator.mul, torch.mul, aten.mul.Tensor)
ADDS = (operator.add, torch.add, aten.add.Tensor)
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def is_call(node, functions=(), methods=()) -> bool:
    """node is call_function of one of `functions` or call_method of one of `methods` (names)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_function" and node.target in functions


def value(node):
    """A node's fake value (None for constants and nodes without shape metadata)."""
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def size_users(node: fx.Node) -> list[fx.Node]:
    """The aten.sym_size.int(node, dim) users a rewrite adds under dynamic shapes (they read no values)."""
    return [u for u in node.users if u.op == "call_function" and u.target == aten.sym_size.int]


def only_used_by(nodes: Iterable[fx.Node], allowed: set[fx.Node]) -> fx.Node | None:
    """The first node with a user outside `allowed`, or None."""
    return next((n for n in nodes if any(u not in allowed for u in n.users)), None)


def activation_quants(graph: fx.Graph, ops: tuple) -> list[fx.Node]:
    """The activation quantizations a rewrite (or a fusion) emitted, calling one of `ops`."""
    return [n for n in graph.nodes
            if n.op == "call_function" and n.target in ops and mxfx_tag(n).get("role") == "activation_quant"]


def rotate_quants(graph: fx.Graph) -> list[fx.Node]:
    """The rewrite's npu_rotate_quant activation quantizations (by op name: on either target)."""
    return [n for n in graph.nodes if n.op == "call_function" and mxfx_tag(n).get("role") == "activation_quant"
            and getattr(n.target, "__name__", "") == "npu_rotate_quant.default"]


def _flattens(node) -> bool:
    """node reshapes its input to [M, K], keeping the last dim: the rewrite's flattening, or the graph's own
    view before aten.mm in aot graphs."""
    if not is_call(node, RESHAPES):
        return False
    if mxfx_tag(node).get("role") == "activation_quant":
        return True
    before, after = value(node.args[0]), value(node)
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and after.dim() == 2
            and before.dim() > 2 and after.shape[-1] == before.shape[-1])


def quant_input(quant: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(the tensor quantized, the flattening reshape before the quantization or None)."""
    x = quant.args[0]
    return (x.args[0], x) if _flattens(x) else (x, None)


_QUANT_DEFAULTS = {"axis": -1, "block_size": 32, "dst_type_max": 0.0, "max_low_bound": 0.0}


def fused_quant_args(quant: fx.Node) -> dict | None:
    """What a fused op takes of an npu_dynamic_mx_quant call (dst_type, round_mode, scale_alg), or None when
    the call uses something no fused op has (another axis or block size, scale_alg 2, dst_type_max, ...)."""
    args = {**_QUANT_DEFAULTS, **quant.kwargs}
    if any(args[k] != v for k, v in _QUANT_DEFAULTS.items()) or args.get("scale_alg") not in (0, 1, None):
        return None
    return {"dst_type": args.get("dst_type", 296), "round_mode": args.get("round_mode", "rint"),
            "scale_alg": args.get("scale_alg") or 0}


def output_items(node: fx.Node) -> dict[int, fx.Node]:
    """The getitem users of a multi-output node, by index."""
    return {u.args[1]: u for u in node.users if u.op == "call_function" and u.target == operator.getitem}


def erase_unused(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase the nodes that have no users left, consumers first."""
    for node in sorted(set(nodes), key=_order(graph).__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


class Emitter:
    """Creates tagged call_function / get_attr nodes with fake values in the graph's own fake mode."""

    def __init__(self, gm: fx.GraphModule, pass_name: str):
        self.gm, self.graph, self.pass_name = gm, gm.graph, pass_name
        values = (value(n) for n in self.graph.nodes)
        self.fake_mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None) or FakeTensorMode()
        self.meta_key = "example_value" if any("example_value" in n.meta for n in self.graph.nodes) else "val"

    def _finish(self, node: fx.Node, fake, tag: dict) -> fx.Node:
        node.meta["mxfx"] = {"pass": self.pass_name, **tag}
        node.meta["val"] = node.meta[self.meta_key] = fake
        return node

    def call(self, target, args: tuple, kwargs: dict | None = None, **tag) -> fx.Node:
        kwargs = kwargs or {}
        node = self.graph.call_function(target, args, kwargs)
        fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), value)
        with self.fake_mode:
            fake = target(*fake_args, **fake_kwargs)
        return self._finish(node, fake, tag)

    def constant(self, attr: str, tensor: torch.Tensor, **tag) -> fx.Node:
        """A buffer on gm read by a get_attr node tagged role "constant" (lift_constants lifts it)."""
        self.gm.register_buffer(attr, tensor)
        node = self.graph.get_attr(attr)
        return self._finish(node, self.fake_mode.from_tensor(tensor, static_shapes=True), {"role": "constant", **tag})


Skip = tuple[FusionSkipReason, str]


class QuantFusion:
    """A pass that replaces the rewrite's activation quantizations (and what feeds them) with a fused op:
    a subclass names its report class and implements fuse(quant) -> the fused op's name, or a Skip."""

    report_class: ClassVar[type]

    def __init__(self, gm: fx.GraphModule, context):
        self.gm, self.graph, self.target = gm, gm.graph, context.target
        self.report = self.report_class()
        self.emit = Emitter(gm, self.report.pass_name)
        self.mx, self.dual = self.target.op("npu_dynamic_mx_quant"), self.target.op("npu_dynamic_dual_level_mx_quant")

    def fuse(self, quant: fx.Node) -> "str | Skip":
        raise NotImplementedError

    def tag(self, quant: fx.Node, op: str) -> dict:
        """The fused nodes' tag: still the linears' activation quantization."""
        return {"role": "activation_quant", "linears": mxfx_tag(quant)["linears"], "linear": mxfx_tag(quant)["linear"],
                "fused": op}

    def replace_quant(self, quant: fx.Node, outputs: dict[int, fx.Node], removed: Iterable[fx.Node]) -> None:
        """Point the quantization's (codes, scales) users at `outputs` and erase what is left unused."""
        items = output_items(quant)
        for index, node in items.items():
            node.replace_all_uses_with(outputs[index])
        erase_unused(self.graph, [*items.values(), quant, *removed])

    def run(self):
        for quant in activation_quants(self.graph, (self.mx, self.dual)):
            linears = mxfx_tag(quant)["linears"]
            if isinstance(outcome := self.fuse(quant), str):
                self.report.fuse(linears, outcome)
            else:
                self.report.skip(linears, *outcome)
        for quant in rotate_quants(self.graph):
            self.report.skip(mxfx_tag(quant)["linears"], FusionSkipReason.ROTATED,
                             "npu_rotate_quant: no fused op also normalizes or applies SwiGLU before a rotation")
        self.graph.lint()
        self.gm.recompile()
        log.info("%s: %s", self.report.pass_name, self.report.summary())
        return self.report

"""quantize_linears: rewrite each eligible linear of a GraphModule into
flatten to 2-D -> activation quant -> quant matmul against prepared constants (+ bias) -> restore shape.

Weights are prepared once per weight (quantized, packed, NZ-cast, scales laid out for the NPU op) and
registered on the GraphModule as buffers read by get_attr nodes. Linears fed by the same activation
share one activation quantization. Every linear the pass sees is reported, rewritten or skipped with
the reason; nothing is rewritten that the scheme cannot serve exactly.
"""

import fnmatch
import functools
import re
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from mxfx.metrics import nbytes
from mxfx.ops.dtypes import SCALAR_TYPE
from mxfx.schemes import Scheme, get_scheme

from .find_linears import LinearSite, find_linears
from .report import LinearReport, RewriteReport
from .targets import Target, get_target

aten = torch.ops.aten

DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "*embed*")
CONSTANT_PREFIX = "_mxfx_"  # the buffers a rewrite registers; the backend lifts them to graph inputs
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
EMBEDDINGS = (torch.nn.functional.embedding, aten.embedding.default)
FLATTENING_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)

Prepare = Callable[[Scheme, Target, torch.Tensor, torch.Tensor | None, torch.dtype], dict[str, torch.Tensor]]


def prepare_weight(scheme: Scheme, target: Target, weight, bias, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The scheme's prepared tensors for a weight (and bias) feeding activations of `dtype`. Under
    no_grad: prepared tensors must not hold the weights through an autograd graph."""
    with torch.no_grad():
        return scheme.prepare_weight(target, weight.to(dtype), bias)


def quantize_linears(
    gm: fx.GraphModule,
    scheme: "str | Scheme" = "mxfp4_dual",
    target: "str | Target" = "reference",
    weights: dict[str, torch.Tensor] | None = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    prepare: Prepare = prepare_weight,
) -> RewriteReport:
    """Rewrite gm in place and return the report.

    weights maps the placeholder / get_attr node names that feed weights and biases to their tensors
    (Dynamo: the example inputs; export: the state dict through the graph signature); get_attr and
    call_module weights not in it are read from gm. include/exclude are fnmatch patterns on module
    FQNs. prepare(scheme, target, weight, bias, activation dtype) -> prepared tensors; pass a caching
    one to reuse prepared weights across compiles.
    """
    rewrite = _Rewrite(gm, get_scheme(scheme), get_target(target), weights or {}, prepare)
    include, exclude = (tuple(include) if include is not None else None), tuple(exclude)
    for site in find_linears(gm):
        try:
            rewrite.site(site, include, exclude)
        except Exception as error:
            raise RewriteError(f"linear {site.fqn or site.weight} (node {site.node.name}): {error}") from error
    gm.graph.lint()
    gm.recompile()
    return rewrite.report


class RewriteError(RuntimeError):
    """A linear the pass had accepted could not be rewritten (the message names it and says why)."""


def fqn_excluded(fqn: str | None, include, exclude) -> str | None:
    """Why include/exclude (fnmatch patterns on module FQNs) leave this linear alone, or None."""
    if fqn is None:
        return "module name unknown and include= given" if include is not None else None
    for pattern in exclude:
        if fnmatch.fnmatchcase(fqn, pattern):
            return f"excluded by pattern {pattern!r}"
    if include is not None and not any(fnmatch.fnmatchcase(fqn, pattern) for pattern in include):
        return "not matched by include patterns"
    return None


class _Rewrite:
    def __init__(self, gm, scheme, target, weights, prepare):
        self.gm, self.graph, self.scheme, self.target = gm, gm.graph, scheme, target
        self.weights, self.prepare = weights, prepare
        self.report = RewriteReport(scheme.name, target.name)
        self.tracer = fx.proxy.GraphAppendingTracer(self.graph)
        # The mode of the graph's own values (a Dynamo backend's tracing context holds another one).
        values = (n.meta.get("val", n.meta.get("example_value")) for n in self.graph.nodes)
        self.fake_mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None) or FakeTensorMode()
        self.meta_key = "example_value" if any("example_value" in n.meta for n in self.graph.nodes) else "val"
        self.prepared: dict[tuple, tuple[dict[str, fx.Node], int]] = {}  # per (weight, bias): nodes, bytes
        self.activations: dict[tuple, _Outputs] = {}
        self.embedding_storages = self._embedding_storages()

    # -- resolving tensors -------------------------------------------------------------------------
    def _attr(self, target: str):
        try:
            return functools.reduce(getattr, target.split("."), self.gm)
        except AttributeError:
            return None

    def tensor(self, name: str | None, node: fx.Node | None):
        if name is None:
            return None
        if node is None:  # call_module: the tensor lives on the module
            return self._attr(name)
        if node.name in self.weights:
            return self.weights[node.name]
        return self._attr(node.target) if node.op == "get_attr" else None

    def _embedding_storages(self) -> set[int]:
        storages = set()
        for node in self.graph.nodes:
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), torch.nn.Embedding):
                weight = self.gm.get_submodule(node.target).weight
            elif node.op == "call_function" and node.target in EMBEDDINGS:
                source = node.args[1] if node.target == torch.nn.functional.embedding else node.args[0]
                weight = self.tensor(source.name, source) if isinstance(source, fx.Node) else None
            else:
                continue
            if isinstance(weight, torch.Tensor):
                storages.add(weight.untyped_storage().data_ptr())
        return storages

    def value(self, node: fx.Node):
        """The fake value of a node: meta["val"] / ["example_value"], or one made from ShapeProp's tensor_meta."""
        value = node.meta.get("val", node.meta.get("example_value"))
        if value is None and "tensor_meta" in node.meta:
            meta = node.meta["tensor_meta"]
            with self.fake_mode:
                value = torch.empty(meta.shape, dtype=meta.dtype)
        return value

    # -- eligibility -------------------------------------------------------------------------------
    def skip_reason(self, site, include, exclude, weight, bias, x, scheme):
        if reason := fqn_excluded(site.fqn, include, exclude):
            return reason
        if not isinstance(weight, torch.Tensor):
            return f"weight {site.weight} is not a constant of the graph"
        if scheme is None:
            return f"scheme {self.scheme.name} has nothing for this weight (stored unquantized)"
        if weight.dtype not in WEIGHT_DTYPES or weight.dim() != 2:
            return f"weight is {weight.dtype} {list(weight.shape)}; supported: 2-D bf16/fp16/fp32"
        if weight.untyped_storage().data_ptr() in self.embedding_storages:
            return "weight is tied to an embedding"
        if site.bias is not None and not isinstance(bias, torch.Tensor):
            return f"bias {site.bias} is not a constant of the graph"
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            return f"bias shape {list(bias.shape)} is not [{weight.shape[0]}]"
        if not isinstance(x, torch.Tensor):
            return "activation has no shape metadata (trace with Dynamo/export, or run ShapeProp first)"
        if x.dtype not in ACTIVATION_DTYPES:
            return f"activation dtype {x.dtype}; the NPU quantizers take bf16/fp16"
        if not isinstance(x.shape[-1], int):
            return "dynamic K (the activation's last dim is symbolic)"
        if x.shape[-1] != weight.shape[1]:
            return f"activation K={x.shape[-1]} does not match weight {list(weight.shape)}"
        return scheme.skip_reason(weight.shape[1])

    def site(self, site: LinearSite, include, exclude) -> None:
        weight = self.tensor(site.weight, site.weight_node)
        bias = self.tensor(site.bias, site.bias_node)
        x = self.value(site.input) if isinstance(site.input, fx.Node) else None
        is_matrix = isinstance(weight, torch.Tensor) and weight.dim() == 2
        scheme = self.scheme.for_weight(weight) if isinstance(weight, torch.Tensor) else self.scheme
        entry = LinearReport(site.fqn or site.weight, weight.shape[1] if is_matrix else None,
                             weight.shape[0] if is_matrix else None, "skipped",
                             bytes_before=nbytes([weight]) if isinstance(weight, torch.Tensor) else 0,
                             scheme=(scheme or self.scheme).name)
        self.report.linears.append(entry)
        if reason := self.skip_reason(site, include, exclude, weight, bias, x, scheme):
            entry.reason = reason
            return
        anchor = site.node.prev  # every new node goes between it and the linear: no scan of the graph
        with self.graph.inserting_before(site.node):
            prepared, entry.bytes_after = self.constants(site, weight, bias, x.dtype, scheme)
            activation = self.activation(site.input, x, scheme)
            y = scheme.matmul(self.target, activation, prepared, SCALAR_TYPE[x.dtype])
            if x.dim() != 2:
                lead = [d if isinstance(d, int) else aten.sym_size.int(self.proxy(site.input), i)
                        for i, d in enumerate(x.shape[:-1])]
                y = aten.reshape.default(y, [*lead, weight.shape[0]])
        new_nodes, node = [], anchor.next
        while node is not site.node:
            new_nodes.append(node)
            node = node.next
        site.node.replace_all_uses_with(y.node)
        transposed = site.node.args[-1] if site.form == "aten_mm" else None
        self.graph.erase_node(site.node)
        if transposed is not None and not transposed.users:
            self.graph.erase_node(transposed)
        self.propagate_meta(new_nodes)
        entry.outcome = "rewritten"

    # -- emission ----------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return fx.Proxy(node, self.tracer)

    def constants(self, site, weight, bias, dtype, scheme) -> tuple[dict[str, fx.Proxy], int]:
        """The prepared weight as get_attr proxies (prepared once per weight), and its bytes (bias excluded)."""
        key = (site.weight, site.bias, dtype)
        if key not in self.prepared:
            tensors = self.prepare(scheme, self.target, weight, bias, dtype)
            stem = self.unused_stem(re.sub(r"\W", "_", f"{CONSTANT_PREFIX}{site.weight}"))
            nodes = {}
            for name, tensor in tensors.items():
                self.gm.register_buffer(f"{stem}_{name}", tensor)
                nodes[name] = self.graph.get_attr(f"{stem}_{name}")
            self.prepared[key] = nodes, nbytes(t for name, t in tensors.items() if name != "bias")
        nodes, size = self.prepared[key]
        return {name: self.proxy(node) for name, node in nodes.items()}, size

    def unused_stem(self, stem: str) -> str:
        """stem, or stem_2, stem_3...: weight names that differ only in punctuation must not collide
        (every prepared set has a "weight")."""
        candidate, count = stem, 1
        while hasattr(self.gm, f"{candidate}_weight"):
            count += 1
            candidate = f"{stem}_{count}"
        return candidate

    def activation(self, x: fx.Node, value: torch.Tensor, scheme: Scheme) -> "_Outputs":
        """One activation quantization per distinct activation (q/k/v share one, gate/up share one)."""
        base = x
        while value.dim() == 2 and base.op == "call_function" and base.target in FLATTENING_VIEWS:
            base = base.args[0]  # views that flatten the same tensor to [M, K] share its quantization
        key = (base, value.shape[-1], value.dtype, scheme.activation)
        if key not in self.activations:
            x2d = self.proxy(x) if value.dim() == 2 else aten.reshape.default(self.proxy(x), [-1, value.shape[-1]])
            self.activations[key] = _Outputs(scheme.quantize_activation(self.target, x2d))
            self.report.activation_quants += bool(scheme.activation)  # "": weight-only, nothing quantized
        return self.activations[key]

    def propagate_meta(self, nodes: list[fx.Node]) -> None:
        """Give each new node a fake value by running it under the graph's fake mode."""
        for node in nodes:
            if node.op == "get_attr":
                value = self.fake_mode.from_tensor(self._attr(node.target), static_shapes=True)
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.value)
                with self.fake_mode:
                    value = node.target(*args, **kwargs)
            node.meta["val"] = node.meta[self.meta_key] = value


class _Outputs:
    """The outputs of an activation quantization, each indexed once however many linears read it."""

    def __init__(self, proxy: fx.Proxy):
        self.proxy, self.items = proxy, {}

    def __getitem__(self, index: int) -> fx.Proxy:
        if index not in self.items:
            self.items[index] = self.proxy[index]
        return self.items[index]

"""quantize_linears: rewrite each eligible linear of a GraphModule, in place, into
flatten to 2-D -> activation quant -> quant matmul against prepared constants (+ bias) -> restore shape.

Weights are prepared once per weight (quantized, packed, NZ-cast, scales laid out for the NPU op) and
registered on the GraphModule as buffers read by get_attr nodes (lift_constants makes them graph
inputs). Linears fed by the same activation share one activation quantization when their schemes'
activation keys agree. Every linear the pass sees is reported, rewritten or skipped with a typed
reason; nothing is rewritten that the scheme cannot serve exactly. Every node it emits is tagged
`node.meta["mxfx"] = {"pass": "quantize_linears", "role": ..., "linear": fqn}` (roles: constant,
activation_quant, matmul, shape, grad_guard (mxfx::inference_only, only where gradients would flow); an
activation quantization lists all its linears under "linears"; a constant names its prepared tensor and its
"source": the weight and bias node names, dtype and scheme).

defer=True (the pipeline's rewrite_linears): nothing is quantized here; each constant's buffer holds a fake
tensor (Scheme.fake_prepare), and passes.prepare_constants prepares the constants still in the graph after
the last pass, so that those a fusion replaces (merge_siblings) are never prepared.
"""

import functools
import logging
import re
from collections.abc import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

from mxfx.metrics import nbytes
from mxfx.recipes import RecipeSelector
from mxfx.schemes import Scheme, SchemeSelector, Tensors, get_scheme
from mxfx.selection import ALL, Selection, Skip, SkipReason
from mxfx.targets import Target, get_target

from .find_linears import LinearSite, MatmulWeight, find_linears, find_other_matmul_weights
from .report import LinearReport, RewriteReport

aten = torch.ops.aten
AOT_VIEWS = (aten.t.default, aten.permute.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
log = logging.getLogger("mxfx.passes")

PASS = "quantize_linears"
CONSTANT_PREFIX = "_mxfx_"  # the names of the buffers a rewrite registers
EMBEDDINGS = (torch.nn.functional.embedding, aten.embedding.default)
FLATTENING_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)

Prepare = Callable[[Scheme, Target, torch.Tensor, torch.Tensor | None, torch.dtype], Tensors]


def prepare_weight(scheme: Scheme, target: Target, weight, bias, dtype: torch.dtype) -> Tensors:
    """The default `prepare`: no cache."""
    return scheme.prepare(target, weight, bias, dtype)


def mxfx_tag(node: fx.Node) -> dict:
    """The tag a pass put on a node it emitted ({} for the graph's own nodes)."""
    return node.meta.get("mxfx", {})


def constant_sources(tag: dict) -> tuple | None:
    """((weight name, bias name) per linear, dtype, scheme) a constant was prepared from: one linear's
    ("source"), or merged siblings' ("sources", one scheme per sibling); None for other nodes."""
    if "source" in tag:
        weight, bias, dtype, scheme = tag["source"]
        return ((weight, bias),), dtype, scheme
    if "sources" in tag:
        pairs, dtype, scheme = tag["sources"]
        return tuple(pairs), dtype, scheme
    return None


def source_tensor(gm: fx.GraphModule, weights: dict[str, torch.Tensor], name: str | None):
    """The tensor a source name in a tag stands for: a graph input in `weights`, else an attribute of gm."""
    if name is None:
        return None
    if name in weights:
        return weights[name]
    return functools.reduce(getattr, name.split("."), gm)


def quantize_linears(
    gm: fx.GraphModule,
    scheme: "str | Scheme | SchemeSelector" = "mxfp4_dual",
    target: "str | Target" = "reference",
    weights: dict[str, torch.Tensor] | None = None,
    *,
    select: Selection = ALL,
    prepare: Prepare = prepare_weight,
    defer: bool = False,
) -> RewriteReport:
    """Rewrite gm in place and return the report.

    weights maps the placeholder / get_attr node names that feed weights and biases to their tensors
    (Dynamo: the example inputs; export: the state dict through the graph signature); get_attr and
    call_module weights not in it are read from gm. select: which linears (include/exclude patterns).
    prepare(scheme, target, weight, bias, activation dtype) -> prepared tensors; pass a caching one to
    reuse prepared weights across compiles. defer: leave the preparation to passes.prepare_constants (the
    module's docstring).
    """
    rewrite = _Rewrite(gm, get_scheme(scheme), get_target(target), weights or {}, prepare, defer)
    sites = find_linears(gm)
    others = find_other_matmul_weights(gm, sites)  # before the rewrite adds matmuls of its own
    for site in sites:
        try:
            rewrite.rewrite_site(site, select)
        except (ValueError, RuntimeError, NotImplementedError) as error:
            raise RewriteError(f"linear {site.fqn or site.weight} (node {site.node.name}): {error}") from error
    for other in others:
        rewrite.report_other_matmul(other)
    _check_folds(rewrite.selector, rewrite.report)
    gm.graph.lint()
    gm.recompile()
    log.info("%s: %s", PASS, rewrite.report.summary())
    return rewrite.report


class RewriteError(RuntimeError):
    """A linear the pass had accepted could not be rewritten (the message names it and says why)."""


def _check_folds(selector, report: RewriteReport) -> None:
    """Report a recipe's offline folds, and refuse a folded pair half rewritten: o_proj (down_proj) would read
    an unrotated (unsmoothed) input, or a rotated (smoothed) one as if it were not (an exclude pattern, a skip
    reason on one side)."""
    if not isinstance(selector, RecipeSelector):
        return
    linears = {r.fqn: r for r in report.linears}
    report.folds = selector.fold_report(set(linears))
    for fold in selector.folds.all() if selector.folds is not None else ():
        pair = [linears.get(name) for name in fold.pair]
        if fold.folded and None not in pair and pair[0].outcome != pair[1].outcome:
            skipped = next(r for r in pair if r.outcome == "skipped")
            raise RewriteError(f"linear {fold.pair[0]}: its {fold.what} is folded into {fold.pair[1]}'s rows, but "
                               f"{skipped.fqn} is skipped ({skipped.reason}): quantize both or neither")


class _TaggingTracer(fx.proxy.GraphAppendingTracer):
    """Appends to the graph and tags every node it creates with the current tag."""

    def __init__(self, graph: fx.Graph):
        super().__init__(graph)
        self.tag: dict = {}

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["mxfx"] = dict(self.tag)
        return node


class _Rewrite:
    def __init__(self, gm, selector, target, weights, prepare, defer):
        self.gm, self.graph, self.selector, self.target = gm, gm.graph, selector, target
        self.weights, self.prepare, self.defer = weights, prepare, defer
        self.report = RewriteReport(selector.label, target.name)
        self.tracer = _TaggingTracer(self.graph)
        # The mode of the graph's own values (a Dynamo backend's tracing context holds another one).
        values = (n.meta.get("val", n.meta.get("example_value")) for n in self.graph.nodes)
        self.fake_mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None) or FakeTensorMode()
        self.meta_key = "example_value" if any("example_value" in n.meta for n in self.graph.nodes) else "val"
        self.prepared: dict[tuple, tuple[dict[str, fx.Node], Tensors, int]] = {}  # per (weight, bias, dtype, scheme)
        self.activations: dict[tuple, _Outputs] = {}
        self.embedding_storages = self._embedding_storages()

    # -- resolving tensors -------------------------------------------------------------------------
    def _attr(self, target: str):
        try:
            return functools.reduce(getattr, target.split("."), self.gm)
        except AttributeError:
            return None

    def resolve_tensor(self, name: str | None, node: fx.Node | None):
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
                weight = self.resolve_tensor(source.name, source) if isinstance(source, fx.Node) else None
            else:
                continue
            if isinstance(weight, torch.Tensor):
                storages.add(weight.untyped_storage().data_ptr())
        return storages

    def fake_value(self, node: fx.Node):
        """The fake value of a node: meta["val"] / ["example_value"], or one made from ShapeProp's tensor_meta."""
        value = node.meta.get("val", node.meta.get("example_value"))
        if value is None and "tensor_meta" in node.meta:
            meta = node.meta["tensor_meta"]
            with self.fake_mode:
                value = torch.empty(meta.shape, dtype=meta.dtype)
        return value

    # -- eligibility -------------------------------------------------------------------------------
    def skip(self, site, select, weight, bias, x, scheme) -> Skip | None:
        if skip := select.skip(site.fqn):
            return skip
        if not isinstance(weight, torch.Tensor):
            return Skip(SkipReason.NOT_CONSTANT, f"weight {site.weight} is not a constant of the graph")
        if scheme is None:
            return Skip(SkipReason.NO_SCHEME,
                        f"scheme {self.selector.label} has nothing for this weight (stored unquantized)")
        if weight.dtype not in scheme.weight_dtypes or weight.dim() != 2:
            supported = "/".join(str(d).removeprefix("torch.") for d in scheme.weight_dtypes)
            return Skip(SkipReason.WEIGHT_DTYPE,
                        f"weight is {weight.dtype} {list(weight.shape)}; supported: 2-D {supported}")
        if weight.untyped_storage().data_ptr() in self.embedding_storages:
            return Skip(SkipReason.TIED_EMBEDDING, "weight is tied to an embedding")
        if site.bias is not None and not isinstance(bias, torch.Tensor):
            return Skip(SkipReason.NOT_CONSTANT, f"bias {site.bias} is not a constant of the graph")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            return Skip(SkipReason.BIAS_SHAPE, f"bias shape {list(bias.shape)} is not [{weight.shape[0]}]")
        if not isinstance(x, torch.Tensor):
            return Skip(SkipReason.NO_SHAPE,
                        "activation has no shape metadata (trace with Dynamo/export, or run ShapeProp first)")
        if x.dtype not in scheme.activation_dtypes:
            return Skip(SkipReason.ACTIVATION_DTYPE, f"activation dtype {x.dtype}; the NPU quantizers take bf16/fp16")
        if not isinstance(x.shape[-1], int):
            return Skip(SkipReason.DYNAMIC_K, "dynamic K (the activation's last dim is symbolic)")
        if x.shape[-1] != weight.shape[1]:
            return Skip(SkipReason.K_MISMATCH, f"activation K={x.shape[-1]} does not match weight {list(weight.shape)}")
        if any(isinstance(d, int) and d == 0 for d in x.shape[:-1]):  # Dynamo specializes 0: a graph of its own
            return Skip(SkipReason.EMPTY, f"activation {list(x.shape)} has no rows: F.linear returns the empty result")
        if x.dtype != weight.dtype:  # left to F.linear, which raises as it does eagerly
            return Skip(SkipReason.DTYPE_MISMATCH, f"activation is {x.dtype}, weight {weight.dtype}: eager F.linear "
                                                   "refuses the mix, and so does the compiled graph")
        return scheme.skip(weight.shape[1])

    def rewrite_site(self, site: LinearSite, select: Selection) -> None:
        weight = self.resolve_tensor(site.weight, site.weight_node)
        bias = self.resolve_tensor(site.bias, site.bias_node)
        x = self.fake_value(site.input) if isinstance(site.input, fx.Node) else None
        is_matrix = isinstance(weight, torch.Tensor) and weight.dim() == 2
        scheme = self.selector.scheme_for(weight) if isinstance(weight, torch.Tensor) else None
        fqn = site.fqn or site.weight
        entry = LinearReport(fqn, weight.shape[1] if is_matrix else None, weight.shape[0] if is_matrix else None,
                             "skipped", bytes_before=nbytes([weight]) if isinstance(weight, torch.Tensor) else 0,
                             scheme=(scheme or self.selector).label)
        self.report.linears.append(entry)
        if skip := self.skip(site, select, weight, bias, x, scheme):
            entry.skip = skip
            log.debug("%s: %s skipped: %s", PASS, fqn, skip.detail)
            return
        anchor = site.node.prev  # every new node goes between it and the linear: no scan of the graph
        with self.graph.inserting_before(site.node):
            prepared, tensors, entry.bytes_after = self.emit_constants(site, fqn, weight, bias, x.dtype, scheme)
            activation = self.emit_activation_quant(site.input, x, scheme, tensors, prepared, fqn)
            # weight / bias: where the linear's tensors come from (site names), for passes that re-prepare them
            self.tracer.tag = {"pass": PASS, "role": "matmul", "linear": fqn, "weight": site.weight, "bias": site.bias}
            y = scheme.matmul(self.target, activation, prepared, x.dtype)
            if getattr(self.fake_value(site.node), "requires_grad", False):  # a gradient would flow: refuse it
                self.tracer.tag = {"pass": PASS, "role": "grad_guard", "linear": fqn}
                weight_node = site.weight_node or self.graph.get_attr(site.weight)
                y = torch.ops.mxfx.inference_only.default(y, self.proxy(site.input), self.proxy(weight_node), fqn)
            if x.dim() != 2:
                self.tracer.tag = {"pass": PASS, "role": "shape", "linear": fqn}
                lead = [d if isinstance(d, int) else aten.sym_size.int(self.proxy(site.input), i)
                        for i, d in enumerate(x.shape[:-1])]
                y = aten.reshape.default(y, [*lead, weight.shape[0]])
        new_nodes, node = [], anchor.next
        while node is not site.node:
            new_nodes.append(node)
            node = node.next
        site.node.replace_all_uses_with(y.node)
        # an aot graph's own views of the weight (t) and the activation (to [M, K]; siblings each have one
        # and share one quantization) go when the linear was their last user
        views = (site.node.args[-1], site.input) if site.form == "aten_mm" else ()
        self.graph.erase_node(site.node)
        for view in views:
            if view.op == "call_function" and view.target in AOT_VIEWS and not view.users:
                self.graph.erase_node(view)
        self.propagate_meta(new_nodes)
        entry.outcome = "rewritten"
        log.debug("%s: %s rewritten with %s (K=%s, N=%s)", PASS, fqn, scheme.label, entry.k, entry.n)

    def report_other_matmul(self, other: MatmulWeight) -> None:
        """List a weight the graph multiplies by outside a linear (reported, never rewritten)."""
        tensor = self.resolve_tensor(other.node.name, other.node)
        if not isinstance(tensor, torch.Tensor):  # an activation, not a weight
            return
        shape, conv1d = list(tensor.shape), other.op == "addmm" and tensor.dim() == 2
        kind = ("[K, N] weight (GPT-2 Conv1D)" if conv1d
                else "3-D weight (grouped MoE experts)" if tensor.dim() == 3 else "weight")
        detail = f"{kind} {shape} multiplied by {other.op}: not a linear mxfx rewrites, so it stays unquantized"
        k, n = (shape[0], shape[1]) if conv1d else (None, None)
        self.report.linears.append(LinearReport(other.fqn or other.node.name, k, n, "skipped",
                                                Skip(SkipReason.UNSUPPORTED_MATMUL, detail), nbytes([tensor]),
                                                scheme=self.selector.label))
        log.debug("%s: %s listed: %s", PASS, other.fqn, detail)

    # -- emission ----------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return fx.Proxy(node, self.tracer)

    def emit_constants(self, site, fqn, weight, bias, dtype, scheme) -> tuple[dict[str, fx.Proxy], Tensors, int]:
        """The prepared weight as get_attr proxies (prepared once per weight and scheme), the tensors,
        and the weight's bytes (Scheme.weight_bytes: no bias, no per-activation constant)."""
        key = (site.weight, site.bias, dtype, scheme)
        if key not in self.prepared:
            with unset_fake_temporarily():  # real weights; aot_autograd runs an engine's passes under its fake mode
                if self.defer:
                    tensors = scheme.fake_prepare(self.target, weight, bias, dtype, self.fake_mode)
                else:
                    tensors = self.prepare(scheme, self.target, weight, bias, dtype)
            stem = self.unused_stem(re.sub(r"\W", "_", f"{CONSTANT_PREFIX}{site.weight}"))
            nodes = {}
            for name, tensor in tensors.items():
                self.gm.register_buffer(f"{stem}_{name}", tensor)
                nodes[name] = self.graph.get_attr(f"{stem}_{name}")
                nodes[name].meta["mxfx"] = {"pass": PASS, "role": "constant", "linear": fqn, "name": name,
                                            "source": key}  # what it was prepared from: (weight, bias, dtype, scheme)
            self.prepared[key] = nodes, tensors, scheme.weight_bytes(tensors)
        nodes, tensors, size = self.prepared[key]
        return {name: self.proxy(node) for name, node in nodes.items()}, tensors, size

    def unused_stem(self, stem: str) -> str:
        """stem, or stem_2, stem_3...: weight names that differ only in punctuation must not collide
        (every prepared set has a "weight")."""
        candidate, count = stem, 1
        while hasattr(self.gm, f"{candidate}_weight"):
            count += 1
            candidate = f"{stem}_{count}"
        return candidate

    def emit_activation_quant(self, x: fx.Node, value: torch.Tensor, scheme: Scheme, tensors: Tensors,
                              prepared: dict[str, fx.Proxy], fqn: str) -> "_Outputs":
        """One activation quantization per distinct (activation, quantization): q/k/v share one, gate/up
        share one, unless their per-activation constants differ."""
        base = x
        while value.dim() == 2 and base.op == "call_function" and base.target in FLATTENING_VIEWS:
            base = base.args[0]  # views that flatten the same tensor to [M, K] share its quantization
        with unset_fake_temporarily():  # the key reads real constants (a smooth scale); an engine's fake mode is on
            key = (base, value.shape[-1], value.dtype, scheme.activation_key(tensors))
        if key not in self.activations:
            self.tracer.tag = {"pass": PASS, "role": "activation_quant", "linears": [], "linear": fqn}
            linears = self.tracer.tag["linears"]
            x2d = self.proxy(x) if value.dim() == 2 else aten.reshape.default(self.proxy(x), [-1, value.shape[-1]])
            quantized = scheme.quantize_activation(self.target, x2d, prepared)
            self.activations[key] = _Outputs(quantized, self.tracer, linears)
            self.report.activation_quants += scheme.activation_rule is not None  # weight-only: nothing quantized
        outputs = self.activations[key]
        outputs.linears.append(fqn)
        return outputs

    def propagate_meta(self, nodes: list[fx.Node]) -> None:
        """Give each new node a fake value by running it under the graph's fake mode."""
        for node in nodes:
            if node.op == "get_attr":
                value = self.fake_mode.from_tensor(self._attr(node.target), static_shapes=True)
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.fake_value)
                with self.fake_mode:
                    value = node.target(*args, **kwargs)
            node.meta["val"] = node.meta[self.meta_key] = value


class _Outputs:
    """The outputs of an activation quantization, each indexed once however many linears read it; the
    index nodes carry the quantization's tag, whose "linears" grows as siblings share it."""

    def __init__(self, proxy: fx.Proxy, tracer: _TaggingTracer, linears: list[str]):
        self.proxy, self.tracer, self.linears, self.items = proxy, tracer, linears, {}
        self.tag = dict(tracer.tag)

    def __getitem__(self, index: int) -> fx.Proxy:
        if index not in self.items:
            saved, self.tracer.tag = self.tracer.tag, self.tag
            self.items[index] = self.proxy[index]
            self.tracer.tag = saved
        return self.items[index]

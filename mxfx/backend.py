"""The torch.compile backend: `torch.compile(model, backend=mxfx_backend)` or `backend="mxfx"`.

On each Dynamo graph: copy it (Dynamo's graph and the user's model are never changed), rewrite its
linears with passes.quantize_linears, lift the prepared constants to new graph inputs with static fake
values (so an NPU graph compiler can freeze them, see shared/notes/torchair.md), and hand the graph to
the inner compiler (eager, inductor, or any backend callable). Prepared weights are cached per weight
tensor (identity and version), scheme and target, so recompiles and second compiles reuse them.

Failure policy: a graph mxfx cannot handle raises MXFXCompileError naming the node and the reason (and
warns first, because without fullgraph=True torch.compile turns a backend error into a graph break and
runs that frame eagerly). fallback="eager" downgrades the error to the warning plus the report.
"""

import warnings
from collections.abc import Callable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

import passes  # attributes are read at call time: `import passes` may be what is importing mxfx
from mxfx.metrics import nbytes
from mxfx.ops import npu as npu_support
from mxfx.schemes import Scheme, get_scheme
from mxfx.tensor_cache import TensorCache

class MXFXCompileError(RuntimeError):
    """mxfx could not quantize a graph it was given."""


class PreparedWeights(TensorCache):
    """Prepared tensors per (weight, bias, scheme, target, dtype), the weight and bias identified by
    identity and version. Weak references only: the bf16 weights stay the model's, and an entry goes
    when its weight does."""

    @property
    def nbytes(self) -> int:
        return sum(nbytes(tensors.values()) for tensors in self.values())

    def prepare(self, scheme: Scheme, target: "passes.Target", weight, bias, dtype) -> dict[str, torch.Tensor]:
        sources = (weight,) if bias is None else (weight, bias)
        return self.get(sources, lambda: passes.prepare_weight(scheme, target, weight, bias, dtype),
                        (bias is None, scheme.name, target.name, dtype))


PREPARED = PreparedWeights()  # process-wide: a second torch.compile of the same model reuses it


def _auto_target() -> str:
    """npu when torch_npu imports and an Ascend 950 is present, else the CPU reference (with a warning
    when an NPU is there but cannot run the MX operators). torch_npu is imported only if installed."""
    if not npu_support.npu_visible():
        return "reference"
    if (problem := npu_support.device_problem()) is not None:
        warnings.warn(f"mxfx: {problem}; compiling for the CPU reference target instead", stacklevel=3)
        return "reference"
    return "npu"


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copied graph (Dynamo's own graph must not be mutated)."""
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    for old, new in mapping.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy


def _lift_constants(gm: fx.GraphModule, fake_mode) -> list[torch.Tensor]:
    """Turn the rewrite's get_attr constants into graph inputs after the existing ones, with static fake
    values; return the tensors, in input order."""
    graph = gm.graph
    constants, last = [], [n for n in graph.nodes if n.op == "placeholder"][-1]
    for node in [n for n in graph.nodes if n.op == "get_attr" and n.target.startswith(passes.CONSTANT_PREFIX)]:
        tensor = gm.get_buffer(node.target)
        with graph.inserting_after(last):
            last = graph.placeholder(node.target)
        last._dynamo_source = None
        fake = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else node.meta["val"]
        last.meta.update(val=fake, example_value=fake)
        node.replace_all_uses_with(last)
        graph.erase_node(node)
        delattr(gm, node.target)
        constants.append(tensor)
    graph.lint()
    gm.recompile()
    return constants


def _weights(gm: fx.GraphModule, example_inputs) -> dict[str, torch.Tensor]:
    """The placeholders Dynamo fed with parameters or buffers of the model: the graph's constants."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {
        node.name: value
        for node, value in zip(placeholders, example_inputs)
        if isinstance(value, torch.nn.Parameter) or node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
    }


def _inductor(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """Inductor with emulate_precision_casts: without it, fused kernels skip the bf16 roundings of the
    unquantized ops, and the MX activation quantizers amplify those differences (a random-weight Qwen3
    kept only 66% of its top-1 tokens); with it the graph computes what eager computes, bit for bit."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    with config.patch(emulate_precision_casts=True):
        return compile_fx(gm, example_inputs)


def torchair_inner(compiler_config=None) -> Callable:
    """torchair's NPU backend as the inner compiler, with the prepared constants frozen.

    compiler_config: the user's torchair.CompilerConfig (default: a new one, GE mode "max-autotune");
    its mode may be "reduce-overhead" / "npugraph_ex" (graph capture) too. mxfx sets
    experimental_config.frozen_parameter, which freezes inputs that are nn.Parameters: the lifted
    constants are passed as such (see Backend).
    """
    import torchair

    config = compiler_config if compiler_config is not None else torchair.CompilerConfig()
    config.experimental_config.frozen_parameter = True
    backend = torchair.get_npu_backend(compiler_config=config)
    backend.mxfx_frozen_constants = True
    return backend


def _inner_compiler(inner) -> Callable:
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, example_inputs: gm
    if inner == "inductor":
        return _inductor
    if inner == "torchair":
        return torchair_inner()
    raise ValueError(f"inner must be 'eager', 'inductor', 'torchair' or a backend callable, got {inner!r}")


class Backend:
    """A torch.compile backend that quantizes linears; keeps the report of every graph it compiled."""

    def __init__(self, scheme="mxfp4_dual", target="auto", inner="eager", include=None, exclude=None,
                 report=None, fallback=None, progress=None, cache: PreparedWeights = PREPARED):
        if fallback not in (None, "eager"):
            raise ValueError(f"fallback must be None or 'eager', got {fallback!r}")
        self.scheme, self.target_name = get_scheme(scheme), target
        self.inner = _inner_compiler(inner)
        if target != "auto":
            passes.get_target(target)  # an unknown name fails here, not at the first compile
        self.include, self._exclude = include, exclude
        self.report_callback, self.fallback, self.progress, self.cache = report, fallback, progress, cache
        self.reports: list[passes.RewriteReport] = []

    @property
    def exclude(self) -> tuple[str, ...]:
        return passes.DEFAULT_EXCLUDE if self._exclude is None else tuple(self._exclude)

    @property
    def target(self) -> "passes.Target":
        return passes.get_target(_auto_target() if self.target_name == "auto" else self.target_name)

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        try:
            graph, constants = self.rewrite(gm, example_inputs)
            if getattr(self.inner, "mxfx_frozen_constants", False):  # torchair freezes Parameters
                constants = [torch.nn.Parameter(t, requires_grad=False) for t in constants]
        except (MXFXCompileError, passes.RewriteError) as error:
            warnings.warn(f"mxfx: {error}", stacklevel=2)
            if self.fallback == "eager":
                return gm.forward
            raise
        compiled = self.inner(graph, [*example_inputs, *constants])
        return lambda *args: compiled(*args, *constants)

    def rewrite(self, gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[torch.Tensor]]:
        """The rewritten copy of a Dynamo graph and the constants to append to its inputs."""
        target = self.target
        if target.name == "npu":
            try:
                npu_support.install()
            except RuntimeError as error:
                raise MXFXCompileError(str(error)) from error
        graph = _copy(gm)
        disable = None if self.progress is None else not self.progress  # None: only on a terminal
        with tqdm(desc=f"mxfx: preparing {self.scheme.name} weights", unit="weight", disable=disable, leave=False) as bar:

            def prepare(*args):
                tensors = self.cache.prepare(*args)
                bar.update()
                return tensors

            report = passes.quantize_linears(graph, self.scheme, target, _weights(graph, example_inputs),
                                             include=self.include, exclude=self.exclude, prepare=prepare)
        self.reports.append(report)
        if self.report_callback is not None:
            self.report_callback(report)
        dynamic = [r for r in report.skipped if r.reason.startswith("dynamic K")]
        if dynamic:
            names = ", ".join(r.fqn for r in dynamic)
            raise MXFXCompileError(f"{names}: K must be static (got a symbolic in_features); mark only batch and "
                                   f"sequence dims dynamic\n{report}")
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        return graph, _lift_constants(graph, fake_mode)


def backend(scheme: str = "mxfp4_dual", target: str = "auto", inner="eager", include=None,
            exclude=None, report: "Callable[[passes.RewriteReport], None] | None" = None,
            fallback: str | None = None, progress: bool | None = None) -> Backend:
    """A configured mxfx backend for torch.compile.

    scheme: "mxfp4_dual" | "mxfp4_w4a8" | "mxfp8"; target: "auto" | "npu" | "reference";
    inner: "eager" | "inductor" | a backend callable(gm, example_inputs); include/exclude: fnmatch
    patterns on module FQNs (exclude defaults to lm_head and embeddings); report: called with each
    graph's RewriteReport (all are also kept in .reports); fallback="eager": warn and run the graph
    unquantized instead of raising; progress: show weight preparation (None: only on a terminal).
    """
    return Backend(scheme, target, inner, include, exclude, report, fallback, progress)


mxfx_backend = backend()

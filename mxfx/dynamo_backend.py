"""The torch.compile backend: `torch.compile(model, backend=mxfx.backend(...))`, `mxfx.mxfx_backend` or
`backend="mxfx"`.

On each Dynamo graph: copy it (Dynamo's graph and the user's model are never changed), run the pass
pipeline on the copy (passes.DEFAULT_PASSES: the linear rewrite and the fusions; then passes.lift_constants, which
makes the prepared constants new graph inputs with static fake values, so that an NPU graph compiler
can freeze them), and hand the graph to the inner compiler (eager, inductor, or any backend callable).
Prepared weights are cached per weight tensor (identity and version), scheme value and target
(mxfx.prepared), so recompiles and second compiles reuse them.

Failure policy: a graph mxfx cannot handle raises MXFXCompileError naming the node and the reason (and
warns first). fallback="eager" downgrades the error to the warning plus the report, running the graph
unquantized.
"""

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from mxfx import parallel, recipes
from mxfx.calibration import Calibration
from mxfx.ops import npu as npu_support
from mxfx.prepared import PREPARED, PreparedWeights
from mxfx.schemes import MODELSLIM, SCHEMES, Scheme, SchemeSelector, get_scheme
from mxfx.selection import Selection, SkipReason
from mxfx.stored_weights import STORED_WEIGHTS, is_placeholder
from mxfx.targets import GE_LACKS, Target, get_target
from mxfx.weight_watch import WeightWatch
from passes import (
    DEFAULT_PASSES,
    UNFUSED_PASSES,
    GraphPass,
    LiftReport,
    PassContext,
    PipelineReport,
    RewriteError,
    RewriteReport,
    find_linears,
    lift_constants,
    run_passes,
)

log = logging.getLogger("mxfx.backend")
DEFAULT_SCHEME = "mxfp4_dual"


class MXFXCompileError(RuntimeError):
    """mxfx could not quantize a graph it was given."""


@dataclass(frozen=True)
class InnerCompiler:
    """The compiler the rewritten graph goes to. constants_as_parameters: pass the lifted constants as
    nn.Parameters (torchair's frozen_parameter freezes exactly those). lacks: fused ops it cannot lower
    (mxfx.targets.Target.lacks), which the target then composes."""

    compile: Callable
    constants_as_parameters: bool = False
    name: str = "callable"
    lacks: frozenset[str] = frozenset()


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
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


def graph_weights(gm: fx.GraphModule, example_inputs) -> dict[str, torch.Tensor]:
    """The placeholders Dynamo fed with parameters or buffers of the model: the graph's constants."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {
        node.name: value
        for node, value in zip(placeholders, example_inputs)
        if isinstance(value, torch.nn.Parameter) or node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
    }


def _placeholders(gm: fx.GraphModule, weights: "dict[str, torch.Tensor] | list") -> list[str]:
    """The linears of `gm` still multiplying by a placeholder weight (a checkpoint loaded with
    bf16_weights=False): unrewritten, they would compute NaN. `weights`: by placeholder name, or the
    graph's example inputs."""
    if isinstance(weights, list):
        weights = graph_weights(gm, weights)
    return [site.fqn or site.weight for site in find_linears(gm)
            if site.weight in weights and is_placeholder(weights[site.weight])]


def _inductor(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """Inductor with emulate_precision_casts: without it, fused kernels skip the bf16 roundings of the
    unquantized ops, and the MX activation quantizers amplify those differences (a random-weight Qwen3
    kept only 66% of its top-1 tokens); with it the graph computes what eager computes, bit for bit."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    with config.patch(emulate_precision_casts=True):
        return compile_fx(gm, example_inputs)


def torchair_inner(compiler_config=None) -> InnerCompiler:
    """torchair's NPU backend as the inner compiler, with the prepared constants frozen.

    compiler_config: the user's torchair.CompilerConfig (default: a new one, GE mode "max-autotune");
    its mode may be "reduce-overhead" / "npugraph_ex" (graph capture) too. mxfx sets
    experimental_config.frozen_parameter, which freezes inputs that are nn.Parameters: the lifted
    constants are passed as such. In GE mode ("max-autotune") the target lacks npu_rotate_quant
    (mxfx.targets.GE_LACKS: torchair converts only its A2/A3 int form).
    """
    try:
        import torchair
    except ImportError as error:
        raise ImportError("inner='torchair' needs torchair, which ships with torch_npu (pip install 'mxfx[npu]' "
                          f"on an Ascend machine): {error}") from error

    config = compiler_config if compiler_config is not None else torchair.CompilerConfig()
    config.experimental_config.frozen_parameter = True
    compile = torchair.get_npu_backend(compiler_config=config)
    lacks = GE_LACKS if config.mode == "max-autotune" else frozenset()
    return InnerCompiler(compile, constants_as_parameters=True, name="torchair", lacks=lacks)


def _inner_compiler(inner) -> InnerCompiler:
    if isinstance(inner, InnerCompiler):
        return inner
    if callable(inner):
        return InnerCompiler(inner)
    if inner == "eager":
        return InnerCompiler(lambda gm, example_inputs: gm, name="eager")
    if inner == "inductor":
        return InnerCompiler(_inductor, name="inductor")
    if inner == "torchair":
        return torchair_inner()
    raise ValueError(f"inner must be 'eager', 'inductor', 'torchair' or a backend callable, got {inner!r}")


def _passes(passes: Iterable[GraphPass] | None, fuse: bool | None) -> tuple[GraphPass, ...]:
    if passes is not None and fuse is not None:
        raise ValueError("give either passes (the whole pipeline) or fuse, not both")
    if passes is None:
        return UNFUSED_PASSES if fuse is False else DEFAULT_PASSES
    return tuple(passes)


class Backend:
    """A torch.compile backend that quantizes linears; keeps the reports of every graph it compiled
    (`reports`: the linear rewrite's, `pipeline_reports`: every pass's)."""

    def __init__(self, scheme: "str | Scheme | SchemeSelector | None" = None, target: "str | Target" = "auto",
                 inner="eager", include=None, exclude=None, report: "Callable[[RewriteReport], None] | None" = None,
                 fallback: str | None = None, progress: bool | None = None, cache: PreparedWeights = PREPARED,
                 passes: Iterable[GraphPass] | None = None, default_exclude: bool = True, fuse: bool | None = None,
                 recipe: "str | recipes.Recipe | None" = None, calibration: Calibration | None = None):
        if fallback not in (None, "eager"):
            raise ValueError(f"fallback must be None or 'eager', got {fallback!r}")
        if report is not None and not callable(report):
            raise TypeError(f"report must be a callable taking the RewriteReport (e.g. print), got {report!r}")
        self.scheme = None if scheme is None else get_scheme(scheme)
        if recipe is None and calibration is not None:
            raise ValueError("a calibration serves a recipe: give recipe= too (mxfx.recipes.RECIPES, or 'recommended')")
        if recipe is not None:  # refused here, not at the first compile
            _, recipe = recipes.check_recipe(self.scheme or DEFAULT_SCHEME, recipe, calibration)
        self.recipe, self.calibration = recipe, calibration
        self._target, self.target_name = target, target if isinstance(target, str) else target.name
        if target != "auto":
            get_target(target)  # an unknown name fails here, not at the first compile
        self.inner = _inner_compiler(inner)
        self.select = Selection.of(include, exclude, default_exclude)
        self.passes = _passes(passes, fuse)
        self.report_callback, self.fallback, self.progress, self.cache = report, fallback, progress, cache
        self.reports: list[RewriteReport] = []
        self.pipeline_reports: list[PipelineReport] = []

    def __repr__(self) -> str:
        scheme = DEFAULT_SCHEME if self.scheme is None else self.scheme.label
        recipe = "" if self.recipe is None else f", recipe={recipes.recipe_name(self.recipe)!r}"
        return f"mxfx.backend(scheme={scheme!r}{recipe}, target={self.target_name!r}, inner={self.inner.name!r})"

    @property
    def target(self) -> Target:
        return get_target(self._target).without(self.inner.lacks)

    def _warn_if_nothing_rewritten(self, report: RewriteReport) -> None:
        """A compile that quantizes nothing is almost always a mistake (an fp32 model, an include that
        matches nothing, a model of Conv1D layers): say why. Graphs without any matmul weight warn only
        while nothing has been quantized yet (generate() and graph breaks make such graphs too)."""
        if report.rewritten or (not report.linears and any(r.rewritten for r in self.reports)):
            return
        if report.linears and all(r.skip_reason is SkipReason.EMPTY for r in report.skipped):
            return  # a zero-token graph (serving, MoE): nothing to quantize, and nothing wrong
        reasons = sorted({r.skip_reason.value for r in report.skipped})
        why = f": every one skipped ({', '.join(reasons)}; the report says which and why)" if reasons else ""
        warnings.warn(f"mxfx: nothing quantized in this graph ({len(report.linears)} matmul weights{why})",
                      stacklevel=4)

    def scheme_for_graph(self, graph: fx.GraphModule, weights: dict[str, torch.Tensor]) -> "Scheme | SchemeSelector":
        """The scheme given (with the recipe, on the graph's selected linears), else the stored codes for a
        graph whose weights came from a quantized checkpoint, else mxfp4_dual."""
        if self.recipe is not None:
            linears = {site.fqn: weights[site.weight] for site in find_linears(graph)
                       if site.fqn and site.weight in weights and self.select.skip(site.fqn) is None}
            return recipes.select(self.scheme or DEFAULT_SCHEME, self.recipe, self.calibration, linears)
        if self.scheme is not None:
            return self.scheme
        if any(weight in STORED_WEIGHTS for weight in weights.values()):
            return MODELSLIM
        return SCHEMES[DEFAULT_SCHEME]

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        target = self.target  # "auto" probes the device (and may warn): once per graph
        try:
            graph, lifted = self.rewrite(gm, example_inputs, target)
        except (MXFXCompileError, RewriteError) as error:
            warnings.warn(f"mxfx: {error}", stacklevel=2)
            if self.fallback == "eager" and not _placeholders(gm, example_inputs):
                return gm.forward
            raise  # unquantized, a graph of placeholder weights would compute NaN
        constants = lifted.constants
        if self.inner.constants_as_parameters:
            constants = [torch.nn.Parameter(t, requires_grad=False) for t in constants]
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        watch = WeightWatch(placeholders, example_inputs, lifted.tags, target)
        compiled = self.inner.compile(graph, [*example_inputs, *constants])

        def run(*args):
            watch.refresh(args, constants)
            return compiled(*args, *constants)

        return run

    def rewrite(self, gm: fx.GraphModule, example_inputs: list,
                target: Target | None = None) -> tuple[fx.GraphModule, LiftReport]:
        """The rewritten copy of a Dynamo graph and the constants to append to its inputs (target: the
        backend's, resolved by the caller or here)."""
        target = target or self.target
        if target.name == "npu":
            try:
                npu_support.install()
            except RuntimeError as error:
                raise MXFXCompileError(str(error)) from error
        graph = copy_graph(gm)
        weights = graph_weights(graph, example_inputs)
        if (dtensors := parallel.dtensor_problem(weights)) is not None:
            raise MXFXCompileError(dtensors)
        scheme = self.scheme_for_graph(graph, weights)
        disable = None if self.progress is None else not self.progress  # None: only on a terminal
        with tqdm(desc=f"mxfx: preparing {scheme.label} weights", unit="weight", disable=disable, leave=False) as bar:

            def prepare(*args):
                tensors = self.cache.prepare(*args)
                bar.update()
                return tensors

            fake_mode = torch._guards.detect_fake_mode(example_inputs)
            context = PassContext(scheme, target, weights, self.select, prepare, fake_mode,
                                  self.cache.prepare_merged, self.cache.discard_prepared)
            pipeline = run_passes(graph, self.passes, context)
        report = next(iter(pipeline.get(RewriteReport)), None)
        if report is not None:
            self.reports.append(report)
            if self.report_callback is not None:
                self.report_callback(report)
            dynamic = [r for r in report.skipped if r.skip_reason is SkipReason.DYNAMIC_K]
            if dynamic:
                names = ", ".join(r.fqn for r in dynamic)
                raise MXFXCompileError(f"{names}: K must be static (got a symbolic in_features); mark only batch and "
                                       f"sequence dims dynamic\n{report}")
            self._warn_if_nothing_rewritten(report)
        if left := _placeholders(graph, weights):
            raise MXFXCompileError(
                f"{', '.join(left)}: loaded without bf16 weights (checkpoint.load(..., bf16_weights=False)), so they "
                f"run only as their stored codes, but this graph leaves them to F.linear (the report says why):\n"
                f"{report}")
        lifted = lift_constants(graph, fake_mode)
        pipeline.passes.append(lifted)
        self.pipeline_reports.append(pipeline)
        lacks = f" (composing {', '.join(sorted(target.lacks))})" if target.lacks else ""
        log.info("mxfx: graph compiled for target %s%s:\n%s", target.name, lacks, pipeline)
        return graph, lifted


def backend(scheme: "str | Scheme | SchemeSelector | None" = None, target: str = "auto", inner="eager",
            include=None, exclude=None, report: "Callable[[RewriteReport], None] | None" = None,
            fallback: str | None = None, progress: bool | None = None,
            passes: Iterable[GraphPass] | None = None, default_exclude: bool = True,
            fuse: bool | None = None, recipe: "str | recipes.Recipe | None" = None,
            calibration=None, bits: float | None = None) -> Backend:
    """A configured mxfx backend for torch.compile.

    scheme: "mxfp4_dual" | "mxfp4_w4a8" | "mxfp8" | "modelslim" (a checkpoint's stored codes) | a Scheme
    value; None: mxfp4_dual, or the stored codes when the graph's weights come from mxfx.checkpoint.load.
    target: "auto" | "npu" | "reference". inner: "eager" | "inductor" | "torchair" | a backend
    callable(gm, example_inputs) | an InnerCompiler. include/exclude: fnmatch patterns on module FQNs (a
    string is one pattern); exclude adds to the default exclusions (lm_head, embeddings), which
    default_exclude=False drops. report: called with each graph's RewriteReport (all are also kept in
    .reports). fallback="eager": warn and run the graph unquantized instead of raising. progress: show
    weight preparation (None: only on a terminal). passes: the graph passes to run, in order (default
    passes.DEFAULT_PASSES: the linear rewrite, then the fusions: merged siblings, norm + quant, SwiGLU +
    quant); constants are lifted after them. fuse=False: the rewrite alone (passes.UNFUSED_PASSES).
    recipe: an accuracy-recovery recipe (mxfx.recipes.RECIPES name, "recommended" or a Recipe) on the
    scheme; calibration: what it reads (mxfx.calibrate(model, batches) on the same model).
    scheme="auto": mixed precision under bits= average bits per weight element; calibration= is then the
    model's measured sensitivities (mxfx.mixed_precision.measure(...); its solve()'s Plan may be passed as
    scheme= directly).
    """
    if scheme == "auto":
        from mxfx import mixed_precision

        if recipe is not None:
            raise ValueError("scheme='auto' picks recovered schemes itself: drop recipe=")
        scheme, calibration = mixed_precision.auto(bits, calibration), None
    elif bits is not None:
        raise ValueError(f"bits= is for scheme='auto', not {scheme!r}")
    return Backend(scheme, target, inner, include, exclude, report, fallback, progress, passes=passes,
                   default_exclude=default_exclude, fuse=fuse, recipe=recipe, calibration=calibration)


mxfx_backend = backend()

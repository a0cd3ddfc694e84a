"""`calibrate(model, batches)`: the statistics of `mxfx.calibration`, collected from the graphs the rewrite
runs on, so that calibration sees exactly the linears the backend quantizes, under the FQNs it uses.

The model runs under torch.compile with a collecting backend: on each Dynamo graph it finds the linears
(`passes.find_linears`; those whose weight is a parameter of the model and that have an FQN, what a
recipe serves: nn.Linear modules and F.linear calls on a parameter alike), groups them by the graph node
they read (q/k/v read one activation, gate/up another: one entry each), adds one recording call per
such node to a copy of the graph and runs that copy as Python, so the values are eager's, bit for bit.
Graph breaks give several graphs, each handled; recompiles (another batch shape) find the same groups
again. A linear called more than once (in one graph or in two) accumulates every call's rows, provided
it shares each of its inputs with the same linears; otherwise its statistics cannot be one activation's,
and calibrating refuses naming it. Dynamo is reset before and after, and the model is not changed.
"""

from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx

from mxfx.calibration import SAMPLE_ROWS, Accumulator, Calibration, CalibrationError, InputStats
from mxfx.dynamo_backend import copy_graph, graph_weights
from passes import find_linears


class _Record(torch.nn.Module):
    """The call a collecting graph makes on one linear input (call_module: the graph calls it like a layer)."""

    def __init__(self, collector: "_Collector", group: tuple[str, ...]):
        super().__init__()
        self.collector, self.group = collector, group

    def forward(self, x: torch.Tensor) -> None:
        self.collector.record(self.group, x)


class _Collector:
    """The collecting backend: accumulators per group of linears (first registered members, in forward
    order), each linear's group and weight, and the groups recorded in the current batch."""

    def __init__(self, gram: bool, rows: int):
        self.gram, self.rows = gram, rows
        self.accumulators: dict[tuple[str, ...], Accumulator] = {}
        self.group_of: dict[str, tuple[str, ...]] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.recorded: set[tuple[str, ...]] = set()

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        graph = copy_graph(gm)  # Dynamo's graph is not changed
        weights = graph_weights(graph, example_inputs)
        readers: dict[fx.Node, list] = {}  # input node -> the linears reading it, in graph order
        for site in find_linears(graph):
            if site.fqn and site.weight in weights:
                self._weight(site.fqn, weights[site.weight])
                readers.setdefault(site.input, []).append(site)
        for index, sites in enumerate(readers.values()):
            group = self._group(tuple(dict.fromkeys(site.fqn for site in sites)), weights[sites[0].weight].shape[1])
            name = f"mxfx_calibration_{index}"
            graph.add_submodule(name, _Record(self, group))
            with graph.graph.inserting_before(sites[0].node):
                graph.graph.call_module(name, (sites[0].input,))
        graph.recompile()
        return graph.forward

    def _weight(self, fqn: str, weight: torch.Tensor) -> None:
        known = self.weights.setdefault(fqn, weight)
        if known is not weight:
            raise CalibrationError(f"linear {fqn}: two weights ({list(known.shape)} and {list(weight.shape)}) are "
                                   "multiplied under this one FQN, so its statistics cannot be keyed by it")

    def _group(self, members: tuple[str, ...], k: int) -> tuple[str, ...]:
        """The group `members` (read one input node) belong to: new, or the one they formed before."""
        known = {self.group_of[m] for m in members if m in self.group_of}
        if not known:
            self.accumulators[members] = Accumulator(k, self.gram, self.rows, seed=len(self.accumulators))
            self.group_of.update(dict.fromkeys(members, members))
            return members
        group = next(iter(known))
        if len(known) > 1 or set(group) != set(members):
            name = next(m for m in members if m in group)
            raise CalibrationError(
                f"linear {name} is called on inputs shared with different linears ({', '.join(members)} on one, "
                f"{', '.join(group)} on another): its statistics cannot be one activation's")
        return group

    def record(self, group: tuple[str, ...], x: torch.Tensor) -> None:
        self.accumulators[group].add(x)
        self.recorded.add(group)


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches: Iterable, gram: bool = True,
              sample_rows: int = SAMPLE_ROWS) -> Calibration:
    """Run `model` on each batch (token ids, or a dict of the model's inputs) and collect the statistics of
    every linear input its graphs have. gram=False skips the Gram matrices (smoothing needs only the
    abs-max); sample_rows: the rows kept per input for the smoothing's alpha search (0: none). Every batch
    must reach every group (a forward that skips a linear is refused, naming it)."""
    if sample_rows < 0:
        raise CalibrationError(f"calibrate: sample_rows must be >= 0, got {sample_rows}")
    collector = _Collector(gram, sample_rows)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=collector)  # one graph per batch shape, then dynamic ones
        count = 0
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # never an uncollected eager run
            for count, batch in enumerate(batches, 1):
                collector.recorded.clear()
                try:
                    compiled(**batch) if isinstance(batch, Mapping) else compiled(batch)
                except Exception as error:  # Dynamo wraps what the backend raised
                    if isinstance(inner := getattr(error, "inner_exception", None), CalibrationError):
                        raise inner from None
                    raise
                if missing := [g for g in collector.accumulators if g not in collector.recorded]:
                    raise CalibrationError(f"calibration batch {count - 1}: linear {missing[0][0]} read no input "
                                           "(its forward took another path than the earlier batches')")
    finally:
        torch._dynamo.reset()
    if not count:
        raise CalibrationError("calibrate: no batches")
    if not collector.accumulators:
        raise CalibrationError("calibrate: the model's graphs have no linear with a parameter weight")
    inputs = [InputStats(group, acc.amax, acc.gram, acc.tokens, acc.sample)
              for group, acc in collector.accumulators.items()]
    return Calibration(inputs, {fqn: tuple(weight.shape) for fqn, weight in collector.weights.items()})

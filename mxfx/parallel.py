"""Tensor parallelism: a transformers Qwen3 (or any model built like it) sharded in place for the calling
rank, the way gpt-fast and vLLM do it, so that each rank compiles its own graph over its own shards.

q/k/v_proj and gate/up_proj are column-parallel (each rank keeps N/tp output rows: its heads, its KV
heads, its slice of the intermediate), o_proj and down_proj row-parallel (each rank keeps K/tp input
columns, and its partial output is summed over the group by a functional all-reduce, which
torch.compile keeps inside the graph). Embeddings, norms and lm_head are replicated. Attention modules'
head counts, MLPs' intermediate_size and the config's fields become the local ones, so the Hugging Face
forward (and a StaticCache built from the config) works per rank unchanged.

Which scheme each linear runs is decided before anything is sharded, from its local K: a row-parallel
linear whose K/tp breaks its scheme's block rule (dual-level's 512 level-0 block) runs single-level
MXFP4 instead where that rule holds, and is refused otherwise (stored codes are never re-quantized);
`ParallelReport` lists every linear's kind, local K and N, decision and why, and `ParallelReport.scheme`
is the selector to compile with.
"""

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from mxfx.schemes import MODELSLIM, MXFP4, SCHEMES, DualLevelMXFP4, Scheme, SchemeSelector, get_scheme
from mxfx.selection import ALL
from mxfx.stored_weights import STORED_WEIGHTS, is_placeholder, placeholder

COLUMN, ROW, REPLICATED = "column", "row", "replicated"
# child linear names of an attention block and of an MLP, and how each is split
ATTENTION = {"q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "o_proj": ROW}
MLP = {"gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW}
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads")  # on attention modules and configs
# a row-parallel linear whose K slice breaks the scheme's rule runs this scheme instead (same FP4 codes
# and activations, one scale level); stored codes are never converted
FALLBACK: dict[type, Scheme] = {DualLevelMXFP4: MXFP4()}


class ParallelError(ValueError):
    """A model, group or checkpoint that cannot be tensor-parallelized as asked; the message says which
    linear, module or rank and what to do."""


@dataclass(frozen=True)
class Layout:
    """Which slice of the model a rank holds."""

    tp_rank: int
    tp_size: int


def blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, dict[str, str]]]:
    """(name, module, linear name -> kind) of every attention block and MLP: modules whose children
    include all the linears of ATTENTION or MLP."""
    found = []
    for name, module in model.named_modules():
        for split in (ATTENTION, MLP):
            if all(isinstance(getattr(module, child, None), torch.nn.Linear) for child in split):
                found.append((name, module, split))
    return found


def linear_kinds(model: torch.nn.Module) -> dict[str, str]:
    """Every nn.Linear's FQN -> column / row / replicated."""
    kinds = {f"{name}.{child}".lstrip("."): kind for name, _, split in blocks(model) for child, kind in split.items()}
    return {name: kinds.get(name, REPLICATED) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _head_dim(name: str, attention: torch.nn.Module, config) -> int:
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if not isinstance(head_dim, int):
        raise ParallelError(f"{name}: no head_dim on the module or its config, so its heads cannot be split")
    return head_dim


def check_divisible(model: torch.nn.Module, tp_size: int) -> None:
    """tp_size divides every attention block's heads and KV heads and every MLP's intermediate size."""
    if tp_size < 1:
        raise ParallelError(f"tp_size must be >= 1, got {tp_size}")
    found = blocks(model)
    if tp_size > 1 and not found:
        raise ParallelError(f"a {type(model).__name__} has no attention blocks (q/k/v/o_proj) or MLPs "
                            "(gate/up/down_proj): mxfx.parallel splits only models built like Qwen3")
    for name, module, split in found:
        if split is ATTENTION:
            head_dim = _head_dim(name, module, getattr(model, "config", None))
            for child, what in (("q_proj", "attention heads"), ("k_proj", "KV heads")):
                outputs = getattr(module, child).out_features
                if outputs % head_dim or (outputs // head_dim) % tp_size:
                    raise ParallelError(f"{name}: tp_size {tp_size} does not divide its {outputs // head_dim} {what} "
                                        f"({child}: {outputs} outputs of head_dim {head_dim})")
        elif module.gate_proj.out_features % tp_size:
            raise ParallelError(f"{name}: tp_size {tp_size} does not divide its intermediate size "
                                f"{module.gate_proj.out_features}")


@dataclass(frozen=True)
class LinearPlan:
    """One linear on one rank: its kind, local K and N, the scheme it runs (None: not quantized here)."""

    name: str
    kind: str
    k: int
    n: int
    scheme: str | None
    decision: str  # "quantize", "fallback", "not quantized"
    why: str


class ParallelSchemes:
    """The selector to compile a parallelized model with: the base scheme, except for the linears the plan
    moved to a fallback scheme (keyed on their sharded weights)."""

    def __init__(self, base: "Scheme | SchemeSelector", fallbacks: dict[torch.Tensor, Scheme]):
        self.base = base
        self.fallbacks = WeakIdKeyDictionary(fallbacks)

    @property
    def label(self) -> str:
        moved = {scheme.label for scheme in self.fallbacks.values()}
        return self.base.label + (f" ({len(self.fallbacks)} linears as {', '.join(sorted(moved))})" if moved else "")

    def scheme_for(self, weight: torch.Tensor) -> Scheme | None:
        fallback = self.fallbacks.get(weight)
        return fallback if fallback is not None else self.base.scheme_for(weight)


@dataclass
class ParallelReport:
    layout: Layout
    linears: list[LinearPlan]
    scheme: "ParallelSchemes | None" = None  # set once the model is sharded

    def __str__(self) -> str:
        rows = [(p.name, p.kind, str(p.k), str(p.n), p.scheme or "-", p.decision, p.why) for p in self.linears]
        header = ("linear", "split", "K", "N", "scheme", "decision", "why")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        moved = sum(p.decision == "fallback" for p in self.linears)
        title = (f"tensor parallel TP={self.layout.tp_size} (rank {self.layout.tp_rank}; every rank's shapes are "
                 f"the same): {len(self.linears)} linears, local K and N, {moved} moved to a fallback scheme")
        return "\n".join([title, *lines])


def _default_scheme(model: torch.nn.Module) -> "Scheme | SchemeSelector":
    """What mxfx.backend() picks: the stored codes for a loaded checkpoint, else mxfp4_dual."""
    from mxfx.dynamo_backend import DEFAULT_SCHEME

    if any(p in STORED_WEIGHTS for p in model.parameters()):
        return MODELSLIM
    return SCHEMES[DEFAULT_SCHEME]


def plan(model: torch.nn.Module, tp_size: int, scheme=None, sharded: bool = False,
         tp_rank: int = 0) -> tuple[ParallelReport, dict[str, Scheme]]:
    """Each linear's local K and N at `tp_size` and the scheme it runs there (the model unchanged:
    `sharded` says it already holds one rank's slice); the fallback scheme per linear name. A linear
    whose local K fits no scheme raises ParallelError naming it."""
    check_divisible(model, 1 if sharded else tp_size)
    selector = get_scheme(scheme) if scheme is not None else _default_scheme(model)
    linears, fallbacks, refused = [], {}, []
    for name, kind in linear_kinds(model).items():
        module = model.get_submodule(name)
        k, n = module.in_features, module.out_features
        if not sharded:
            k, n = (k // tp_size, n) if kind == ROW else (k, n // tp_size) if kind == COLUMN else (k, n)
        if (excluded := ALL.skip(name)) is not None:  # what the backend leaves alone by default (lm_head)
            linears.append(LinearPlan(name, kind, k, n, None, "not quantized", str(excluded)))
            continue
        chosen = selector.scheme_for(module.weight)
        if chosen is None:
            linears.append(LinearPlan(name, kind, k, n, None, "not quantized",
                                      f"{selector.label} has nothing for this weight"))
            continue
        skip = chosen.skip(k)
        if skip is None:
            why = f"K={k} meets {chosen.name}'s rule (multiple of {chosen.k_multiple})"
            linears.append(LinearPlan(name, kind, k, n, chosen.label, "quantize", why))
            continue
        full_ok = kind == ROW and chosen.skip(k * tp_size) is None
        fallback = FALLBACK.get(type(chosen)) if full_ok and not chosen.stored else None
        if fallback is not None and fallback.skip(k) is None:
            fallbacks[name] = fallback
            linears.append(LinearPlan(name, kind, k, n, fallback.label, "fallback",
                                      f"{skip}: K/{tp_size} breaks the rule, {fallback.name}'s holds"))
        elif full_ok:
            refused.append(f"{name} (row-parallel K={k * tp_size}, {k} per rank: {skip}"
                           f"{'; its stored codes are not re-quantized' if chosen.stored else ''})")
        else:  # the rule fails unsharded too: the backend skips it as it would at TP=1
            linears.append(LinearPlan(name, kind, k, n, chosen.label, "not quantized", str(skip)))
    if refused:
        raise ParallelError(f"at TP={tp_size}, no scheme serves the local K of {'; '.join(refused)}: choose a "
                            f"tp_size whose K slices meet the rule, another scheme, or exclude these linears")
    return ParallelReport(Layout(tp_rank, tp_size), linears), fallbacks


def check_shardable(model: torch.nn.Module, report: ParallelReport, scheme=None) -> None:
    """Refuse a selector that has a scheme for a weight but none for the rank's slice of it (one keyed on
    the tensors themselves: a recipe's, a mixed-precision plan's), which would leave the sharded linears
    unquantized; stored codes are sharded with their registration, so they are not asked."""
    selector = get_scheme(scheme) if scheme is not None else _default_scheme(model)
    for p in report.linears:
        weight = model.get_submodule(p.name).weight
        if p.scheme is None or p.kind == REPLICATED or STORED_WEIGHTS.get(weight) is not None:
            continue
        n, k = weight.shape
        rows = shard_range(n, report.layout) if p.kind == COLUMN else (0, n)
        cols = shard_range(k, report.layout) if p.kind == ROW else (0, k)
        if selector.scheme_for(weight.detach()[rows[0]:rows[1], cols[0]:cols[1]]) is None:
            raise ParallelError(f"{selector.label} chooses schemes by the weights themselves (a recipe's or a mixed-"
                                f"precision plan's selector) and has none for {p.name}'s shard: write a checkpoint "
                                f"with it (mxfx quantize; --tp N keeps a mixed plan's K rules at that size) and load "
                                f"it per rank with checkpoint.load(path, tp_rank, tp_size)")


def constrain(sensitivity, model: torch.nn.Module, tp_size: int):
    """A mixed-precision measurement (mxfx.mixed_precision.Sensitivity) without the options whose scheme
    breaks its K rule on a row-parallel linear's K/tp_size slice, so that a plan solved from it runs (and
    its checkpoint loads) at that TP size unchanged; also (fqn, label, why) of each dropped option."""
    check_divisible(model, tp_size)
    kinds = linear_kinds(model)
    drop, dropped = {}, []
    for fqn, linear in sensitivity.linears.items():
        if kinds.get(fqn) != ROW or tp_size == 1:
            continue
        for label in linear.options:
            scheme = sensitivity.scheme(fqn, label)
            if scheme is not None and (skip := scheme.skip(linear.k // tp_size)) is not None:
                drop.setdefault(fqn, set()).add(label)
                dropped.append((fqn, label, f"K/{tp_size} = {linear.k // tp_size}: {skip}"))
    return sensitivity.restricted(drop), dropped


def local_config(config, tp_size: int):
    """A copy of a Hugging Face config with one rank's head counts and intermediate size (head_dim made
    explicit, since it would otherwise be derived from the head count)."""
    local = copy.deepcopy(config)
    local.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for attribute in (*HEAD_ATTRIBUTES, "intermediate_size"):
        if isinstance(getattr(config, attribute, None), int):
            setattr(local, attribute, getattr(config, attribute) // tp_size)
    return local


def shard_range(size: int, layout: Layout) -> tuple[int, int]:
    """The rank's even slice [lo, hi) of a dimension of `size`."""
    step = size // layout.tp_size
    return layout.tp_rank * step, (layout.tp_rank + 1) * step


def _shard_linear(model, name: str, kind: str, layout: Layout) -> None:
    """One linear's weight (and bias, and stored codes) replaced by the rank's slice; a row-parallel bias
    stays on rank 0 only (it is added once, after the all-reduce)."""
    from mxfx.checkpoint.stored import shard_stored

    module = model.get_submodule(name)
    weight, n, k = module.weight, module.out_features, module.in_features
    rows = shard_range(n, layout) if kind == COLUMN else (0, n)
    cols = shard_range(k, layout) if kind == ROW else (0, k)
    stored = STORED_WEIGHTS.get(weight)
    if is_placeholder(weight):  # codes only (checkpoint.load(bf16_weights=False)): no values to slice
        local = placeholder((rows[1] - rows[0], cols[1] - cols[0]), weight.dtype, weight.device)
    else:
        local = torch.nn.Parameter(weight.detach()[rows[0]:rows[1], cols[0]:cols[1]].clone(),
                                   requires_grad=weight.requires_grad)
    if stored is not None:
        STORED_WEIGHTS.add(local, shard_stored(name, stored, (n, k), rows, cols))
    module.weight = local
    module.in_features, module.out_features = cols[1] - cols[0], rows[1] - rows[0]
    if module.bias is not None:
        if kind == COLUMN:
            module.bias = torch.nn.Parameter(module.bias.detach()[rows[0]:rows[1]].clone(),
                                             requires_grad=module.bias.requires_grad)
        elif kind == ROW and layout.tp_rank:
            module.bias = None


def _localize(model: torch.nn.Module, tp_size: int) -> None:
    """Head counts, intermediate sizes and the config's fields become one rank's."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    for config in configs.values():
        local = local_config(config, tp_size)
        for attribute in (*HEAD_ATTRIBUTES, "intermediate_size", "head_dim"):
            if hasattr(local, attribute):
                setattr(config, attribute, getattr(local, attribute))
    for _, module, split in blocks(model):
        for attribute in (HEAD_ATTRIBUTES if split is ATTENTION else ("intermediate_size",)):
            if isinstance(getattr(module, attribute, None), int):
                setattr(module, attribute, getattr(module, attribute) // tp_size)


class _AllReduce:
    """A row-parallel linear's forward hook: the partial outputs summed over the group, with the functional
    collective (a graph op torch.compile keeps in one graph, unlike dist.all_reduce)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, module, args, output):
        from torch.distributed._functional_collectives import all_reduce

        return all_reduce(output, "sum", self.group)


def _unconnected(module, args):
    raise ParallelError("this model holds one rank's shards (mxfx.checkpoint.load with tp_size > 1) and is not "
                        "connected to its group: call mxfx.parallel.tensor_parallel(model, group) before running it")


def mark_sharded(model: torch.nn.Module, layout: Layout) -> None:
    """Record that `model` holds `layout`'s slice, and refuse to run it until tensor_parallel connects it."""
    model.mxfx_tp = layout
    model.mxfx_tp_guard = model.register_forward_pre_hook(_unconnected)


def dtensor_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """What to do about DTensor weights (a model parallelized with torch.distributed.tensor.parallel), if
    any: mxfx quantizes plain local shards, and the MX ops have no DTensor sharding rules."""
    if not dist.is_available() or not dist.is_initialized():  # no process group, no DTensor
        return None
    from torch.distributed.tensor import DTensor

    names = [name for name, t in tensors.items() if isinstance(t, DTensor)]
    if not names:
        return None
    return (f"{names[0]} is a DTensor ({len(names)} in all: the model was parallelized with "
            "torch.distributed.tensor.parallel), which mxfx does not quantize: shard the plain model with "
            "mxfx.parallel.tensor_parallel(model) instead of parallelize_module (same column/row split, local "
            "tensors and a functional all-reduce), then compile it with mxfx.backend(report.scheme)")


def _agree(group, signature: tuple | None, problem: str | None) -> None:
    """Every rank of the group planned the same model the same way; a problem
    found on any rank is raised on all of them (a rank raising alone would leave the others waiting in
    their first collective)."""
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (signature, problem), group=group)
    rank = dist.get_rank(group)
    for other, (_, theirs) in enumerate(gathered):
        if theirs is not None:
            raise ParallelError(theirs if other == rank else f"group rank {other}: {theirs}")
    different = [other for other, (theirs, _) in enumerate(gathered) if theirs != signature]
    if different:
        raise ParallelError(f"group rank {different[0]} planned a different model or scheme than group rank {rank}: "
                            "every rank must shard the same model with the same scheme")


def tensor_parallel(model: torch.nn.Module, group=None, scheme=None) -> ParallelReport:
    """Shard `model` in place for this process's rank of `group` (default: the world) and connect its
    row-parallel linears to the group; returns the per-linear plan and, as `.scheme`, the selector to
    compile with (`mxfx.backend(report.scheme)`). A model loaded per rank (mxfx.checkpoint.load with
    tp_rank/tp_size) is already sharded and only checked and connected. Every rank must call it; the
    plan is checked on all ranks before any of them changes its model."""
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError("tensor_parallel needs torch.distributed initialized (init_process_group) on every rank")
    group = group if group is not None else dist.group.WORLD
    layout = Layout(dist.get_rank(group), dist.get_world_size(group))
    loaded = getattr(model, "mxfx_tp", None)
    report, signature, problem = None, None, None
    try:
        if (dtensors := dtensor_problem(dict(model.named_parameters()))) is not None:
            raise ParallelError(dtensors)
        if loaded is not None and getattr(model, "mxfx_tp_guard", None) is None:
            raise ParallelError(f"the model is already parallelized (rank {loaded.tp_rank} of {loaded.tp_size})")
        if loaded is not None and loaded != layout:
            raise ParallelError(f"the model was loaded as rank {loaded.tp_rank} of TP={loaded.tp_size}, but this "
                                f"process is rank {layout.tp_rank} of a group of {layout.tp_size}: load it with "
                                f"tp_rank={layout.tp_rank}, tp_size={layout.tp_size}")
        report, _ = plan(model, layout.tp_size, scheme, sharded=loaded is not None, tp_rank=layout.tp_rank)
        if loaded is None and layout.tp_size > 1:
            check_shardable(model, report, scheme)
        signature = (type(model).__name__, tuple((p.name, p.kind, p.k, p.n, p.scheme) for p in report.linears))
    except ParallelError as error:
        problem = str(error)
    _agree(group, signature, problem)
    kinds = {p.name: p.kind for p in report.linears}
    if loaded is None and layout.tp_size > 1:
        for name, kind in kinds.items():
            if kind != REPLICATED:
                _shard_linear(model, name, kind, layout)
        _localize(model, layout.tp_size)
    if layout.tp_size > 1:
        reduce = _AllReduce(group)
        for name, kind in kinds.items():
            if kind == ROW:
                model.get_submodule(name).register_forward_hook(reduce)
    if loaded is not None:
        model.mxfx_tp_guard.remove()
    model.mxfx_tp, model.mxfx_tp_guard = layout, None
    report.scheme = parallel_scheme(model, scheme)
    return report


def parallel_scheme(model: torch.nn.Module, scheme=None) -> ParallelSchemes:
    """The selector to compile a parallelized model with for `scheme` (tensor_parallel returns the one for
    the scheme it was given; this gives the others' without sharding again)."""
    layout = getattr(model, "mxfx_tp", None)
    if layout is None or getattr(model, "mxfx_tp_guard", None) is not None:
        raise ParallelError("the model is not parallelized: call mxfx.parallel.tensor_parallel(model) first")
    _, fallbacks = plan(model, layout.tp_size, scheme, sharded=True, tp_rank=layout.tp_rank)
    base = get_scheme(scheme) if scheme is not None else _default_scheme(model)
    return ParallelSchemes(base, {model.get_submodule(name).weight: s for name, s in fallbacks.items()})

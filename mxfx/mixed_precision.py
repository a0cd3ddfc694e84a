"""Mixed precision under a size budget (`scheme="auto"`): each linear gets bf16 or one of the candidate
schemes so that the average bits per eligible weight element is at most B and the summed measured
sensitivity is the lowest any assignment reaches.

- Sensitivity (`measure`): per linear and candidate, the mean per-token KL(bf16 || quantized) of the
  model's next-token distribution on calibration batches when that linear alone runs the candidate
  (`Scheme.linear` through a forward hook, removed afterwards: the model is never changed).
- Bytes: what the matmul reads for the weight, counted from the prepared tensors (codes and scales; not
  the bias nor per-activation constants such as a rotation, which one activation shares); bf16 is 16 bits.
- Constraints: linears on one activation (q/k/v, gate/up; grouped as `mxfx.calibrate` groups them) are a
  group that is either all bf16 or quantizes its activation once: every member's activation key equal
  (share="activation"); share="type" also asks for one scheme name per group (one stored type, what
  vllm-ascend's fused qkv/gate_up linears and `passes.merge_siblings` need). K rules: a candidate a
  linear's K does not meet is not offered to it.
- Solver (`solve`): exact. Per group, every assignment of its members honouring the constraint; across
  groups, a dynamic program over the Pareto frontier of (bytes, summed sensitivity), vectorized per group.

The plan is a selector (`mxfx.backend(scheme=plan)`); `Sensitivity.save/load` cache the measurement in a
JSON file beside the calibration file, refused for another model's weights or other batches.
"""

import hashlib
import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from mxfx import recipes
from mxfx.calibrating import calibrate
from mxfx.calibration import Calibration
from mxfx.schemes import SCHEMES, Scheme
from mxfx.selection import Selection
from mxfx.targets import Target, get_target

FORMAT = "mxfx-sensitivity/1"
BF16 = "bf16"
SHARES = ("activation", "type")
# candidates without a calibration, and with one (the recommended recipes need its Gram matrices)
PLAIN_CANDIDATES = ("mxfp8", "mxfp4_w4a8", "mxfp4_dual")
RECOVERED_CANDIDATES = ("mxfp8", "mxfp4_w4a8+gptq", "mxfp4_dual+rotate+gptq")
WRITABLE_CANDIDATES = ("mxfp8", "mxfp4_w4a8+gptq", "mxfp4_dual+gptq")  # a checkpoint stores no rotation


class BudgetError(ValueError):
    """No assignment fits the budget (the message gives the smallest achievable average)."""


def _digest(key: Hashable) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def _fingerprint(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(repr((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Option:
    """One candidate for one linear: weight bytes, sensitivity (KL, nats per token), activation key
    digest (None: bf16, not quantized) and scheme name (the stored type's)."""

    bytes: int
    kl: float
    activation: str | None
    scheme: str | None


@dataclass
class Linear:
    fqn: str
    n: int
    k: int
    options: dict[str, Option]  # label -> option, bf16 first

    @property
    def elements(self) -> int:
        return self.n * self.k


def _resolve(candidates: Sequence[str], calibration: Calibration | None, model) -> dict[str, object]:
    """label -> a scheme (plain) or a per-weight selector (scheme+recipe, mxfx.recipes.apply without the
    offline folds: each linear is measured alone and may be combined with any choice for its neighbour)."""
    resolved = {}
    for label in candidates:
        if label == BF16:
            raise ValueError("bf16 is always a candidate; do not list it")
        name, _, recipe = label.partition("+")
        if name not in SCHEMES:
            raise ValueError(f"candidate {label!r}: unknown scheme {name!r}; choose SCHEME or SCHEME+RECIPE with a "
                             f"scheme of {', '.join(SCHEMES)}")
        resolved[label] = recipes.apply(name, recipe, calibration, model, fold=False) if recipe else SCHEMES[name]
    return resolved


class Sensitivity:
    """The measurement: per eligible linear its options, the groups (linears on one activation, in
    forward order), and the scheme values of the model it was measured on (bound by weight identity)."""

    def __init__(self, linears: list[Linear], groups: list[tuple[str, ...]], candidates: tuple[str, ...],
                 model_fingerprint: str, batches_fingerprint: str, tokens: int):
        self.linears = {linear.fqn: linear for linear in linears}
        self.groups, self.candidates = groups, candidates
        self.model_fingerprint, self.batches_fingerprint, self.tokens = model_fingerprint, batches_fingerprint, tokens
        self._fqn_of = WeakIdKeyDictionary()  # weight -> fqn
        self._schemes: dict[tuple[str, str], Scheme] = {}

    def __repr__(self) -> str:
        return (f"Sensitivity({len(self.linears)} linears in {len(self.groups)} groups, candidates "
                f"{', '.join(self.candidates)}, {self.tokens} tokens)")

    @property
    def elements(self) -> int:
        return sum(linear.elements for linear in self.linears.values())

    def bind(self, model: torch.nn.Module, calibration: Calibration | None = None) -> "Sensitivity":
        """Attach the scheme values of `model`'s weights (refused unless they are the measured ones); a
        copy of the model (equal weights) may be bound too, beside it."""
        modules = {fqn: model.get_submodule(fqn) for fqn in self.linears}
        for fqn, linear in self.linears.items():
            module = modules[fqn]
            if not isinstance(module, torch.nn.Linear) or (module.out_features, module.in_features) != (linear.n,
                                                                                                       linear.k):
                raise ValueError(f"the sensitivity is for another model: linear {fqn} is [N, K] = "
                                 f"{[linear.n, linear.k]} in it")
        if _model_fingerprint(modules) != self.model_fingerprint:
            raise ValueError("the sensitivity was measured on other weights (their fingerprint differs): measure it "
                             "again on this model")
        resolved = _resolve(self.candidates, calibration, model)
        for fqn, module in modules.items():
            self._fqn_of[module.weight] = fqn
            for label in self.linears[fqn].options:
                if label != BF16:
                    self._schemes[fqn, label] = resolved[label].scheme_for(module.weight)
        return self

    def restricted(self, drop: dict[str, set[str]]) -> "Sensitivity":
        """A copy without the options `drop` names per linear (bf16 always stays), bound like this one:
        what a constraint outside the measurement (e.g. tensor parallelism's local K) leaves."""
        if any(BF16 in labels for labels in drop.values()):
            raise ValueError("bf16 is every linear's option; it cannot be dropped")
        linears = [Linear(linear.fqn, linear.n, linear.k,
                          {label: o for label, o in linear.options.items() if label not in drop.get(fqn, ())})
                   for fqn, linear in self.linears.items()]
        copy = Sensitivity(linears, self.groups, self.candidates, self.model_fingerprint, self.batches_fingerprint,
                           self.tokens)
        copy._fqn_of, copy._schemes = self._fqn_of, self._schemes
        return copy

    def fqn_of(self, weight: torch.Tensor) -> str | None:
        return self._fqn_of.get(weight)

    def scheme(self, fqn: str, label: str) -> Scheme | None:
        if label == BF16:
            return None
        if (fqn, label) not in self._schemes:
            raise ValueError(f"linear {fqn}: no scheme {label!r} bound (bind the sensitivity to its model)")
        return self._schemes[fqn, label]

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        description = {
            "format": FORMAT, "candidates": list(self.candidates), "model": self.model_fingerprint,
            "batches": self.batches_fingerprint, "tokens": self.tokens, "groups": [list(g) for g in self.groups],
            "linears": {fqn: {"n": linear.n, "k": linear.k,
                              "options": {label: vars(option) for label, option in linear.options.items()}}
                        for fqn, linear in self.linears.items()},
        }
        Path(path).write_text(json.dumps(description, indent=1))

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module, calibration: Calibration | None = None) -> "Sensitivity":
        """A saved measurement bound to `model` (the one it was measured on; calibration: the one it used,
        when a candidate has a recipe)."""
        try:
            description = json.loads(Path(path).read_text())
            if description.get("format") != FORMAT:
                raise ValueError(f"format {description.get('format')!r}, expected {FORMAT}")
            linears = [Linear(fqn, entry["n"], entry["k"],
                              {label: Option(**option) for label, option in entry["options"].items()})
                       for fqn, entry in description["linears"].items()]
            sensitivity = cls(linears, [tuple(g) for g in description["groups"]], tuple(description["candidates"]),
                              description["model"], description["batches"], description["tokens"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not an mxfx sensitivity file ({error})") from error
        return sensitivity.bind(model, calibration)


def _model_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    return _fingerprint(t for module in modules.values() for t in (module.weight, module.bias) if t is not None)


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Summed KL(p || q) over tokens, fp32, from p's log-probabilities and q's logits."""
    q = torch.log_softmax(logits.float(), -1)
    return (reference.exp() * (reference - q)).sum()


@torch.no_grad()
def measure(model: torch.nn.Module, batches: Sequence[torch.Tensor], calibration: Calibration | None = None,
            candidates: Sequence[str] | None = None, include=None, exclude=None, target: "str | Target" = "reference",
            progress: bool | None = None) -> Sensitivity:
    """Each eligible linear's sensitivity to each candidate (SCHEME or SCHEME+RECIPE, e.g.
    "mxfp4_w4a8+gptq"; default: RECOVERED_CANDIDATES with a calibration, PLAIN_CANDIDATES without) on
    `batches` (token ids [B, T]). Eligible: the backend's selection (include/exclude patterns, lm_head and
    embeddings excluded by default), a 2-D bf16/fp16 weight, and one candidate whose K rule it meets."""
    batches = list(batches)
    if not batches:
        raise ValueError("measure: no batches")
    if candidates is None:
        candidates = RECOVERED_CANDIDATES if calibration is not None else PLAIN_CANDIDATES
    candidates = tuple(candidates)
    target = get_target(target) if isinstance(target, str) else target
    resolved = _resolve(candidates, calibration, model)
    select = Selection.of(include, exclude)
    modules = {fqn: m for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and select.skip(fqn) is None and m.weight.dtype in (torch.bfloat16, torch.float16)}
    served = {fqn: [label for label in candidates if resolved[label].scheme_for(m.weight) is not None
                    and resolved[label].scheme_for(m.weight).skip(m.in_features) is None]
              for fqn, m in modules.items()}
    modules = {fqn: m for fqn, m in modules.items() if served[fqn]}
    if not modules:
        raise ValueError(f"measure: no linear of the model is eligible for {', '.join(candidates)}")
    members = (calibration.inputs if calibration is not None
               else calibrate(model, batches[:1], gram=False, sample_rows=0).inputs)
    groups = [g for g in (tuple(m for m in stats.members if m in modules) for stats in members) if g]

    references = [torch.log_softmax(model(batch).logits.float(), -1) for batch in batches]
    tokens = sum(r.shape[0] * r.shape[1] for r in references)
    linears = []
    with tqdm(total=sum(map(len, served.values())), desc="mxfx: sensitivity", unit="run", disable=None if progress
              is None else not progress, leave=False) as bar:
        for fqn, module in modules.items():
            weight = module.weight
            options = {BF16: Option(2 * weight.numel(), 0.0, None, None)}
            for label in served[fqn]:
                scheme = resolved[label].scheme_for(weight)
                prepared = scheme.prepare(target, weight, module.bias, weight.dtype)
                handle = module.register_forward_hook(
                    lambda m, args, out, scheme=scheme, prepared=prepared: scheme.linear(target, args[0], prepared))
                try:
                    kl = sum(_kl(r, model(batch).logits).item() for r, batch in zip(references, batches)) / tokens
                finally:
                    handle.remove()
                options[label] = Option(scheme.weight_bytes(prepared), max(kl, 0.0),
                                        _digest(scheme.activation_key(prepared)), scheme.name)
                bar.update()
            linears.append(Linear(fqn, module.out_features, module.in_features, options))
    sensitivity = Sensitivity(linears, groups, candidates, _model_fingerprint(modules), _fingerprint(batches), tokens)
    return sensitivity.bind(model, calibration)


# -- the solver ------------------------------------------------------------------------------------
def _group_options(linears: list[Linear], share: str) -> list[tuple[tuple[str, ...], int, float]]:
    """Every assignment of one group's members that honours the constraint: (labels, bytes, kl)."""
    def key(option: Option):
        return option.activation if share == "activation" else (option.activation, option.scheme)

    keys = set.intersection(*({key(o) for o in linear.options.values() if o.activation} for linear in linears))
    assignments = [tuple(BF16 for _ in linears)]
    for k in sorted(keys, key=repr):
        per_member = [[label for label, o in linear.options.items() if o.activation and key(o) == k]
                      for linear in linears]
        combos = [()]
        for labels in per_member:
            combos = [(*c, label) for c in combos for label in labels]
        assignments += combos
    return [(labels, sum(linear.options[label].bytes for linear, label in zip(linears, labels)),
             sum(linear.options[label].kl for linear, label in zip(linears, labels))) for labels in assignments]


def _pareto(nbytes: np.ndarray, kl: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both bytes and KL (ties: the first)."""
    order = np.lexsort((kl, nbytes))
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(kl[order])[:-1]))
    return order[kl[order] < best_before]


def budget_bytes(bits: float, elements: int) -> int:
    return math.floor(bits * elements / 8)


def solve(sensitivity: Sensitivity, bits: float, share: str = "activation") -> "Plan":
    """The assignment with the lowest summed sensitivity whose weight bytes are at most
    bits * eligible elements / 8. BudgetError when even the smallest assignment is above it."""
    if share not in SHARES:
        raise ValueError(f"share must be one of {', '.join(SHARES)}, got {share!r}")
    budget = budget_bytes(bits, sensitivity.elements)
    stages = [_group_options([sensitivity.linears[m] for m in group], share) for group in sensitivity.groups]
    smallest = sum(min(option[1] for option in stage) for stage in stages)
    if smallest > budget:
        raise BudgetError(f"no assignment fits {bits} bits per weight element: the minimum achievable with candidates "
                          f"{', '.join(sensitivity.candidates)} is {8 * smallest / sensitivity.elements:.4f} bits")
    # states of the frontier after each group: bytes, kl, (previous state, option of this group)
    nbytes, kl, parents = np.zeros(1, dtype=np.int64), np.zeros(1), []
    for stage in stages:
        stage_bytes = np.array([o[1] for o in stage], dtype=np.int64)
        stage_kl = np.array([o[2] for o in stage])
        total_bytes = (nbytes[:, None] + stage_bytes[None, :]).ravel()
        total_kl = (kl[:, None] + stage_kl[None, :]).ravel()
        fits = np.flatnonzero(total_bytes <= budget)
        keep = fits[_pareto(total_bytes[fits], total_kl[fits])]
        nbytes, kl = total_bytes[keep], total_kl[keep]
        parents.append(np.stack(np.divmod(keep, len(stage)), 1))
    state = int(np.lexsort((nbytes, kl))[0])
    choices = {}
    for stage, group, parent in zip(reversed(stages), reversed(sensitivity.groups), reversed(parents)):
        state, option = (int(v) for v in parent[state])
        choices.update(zip(group, stage[option][0]))
    return Plan(sensitivity, {fqn: choices[fqn] for fqn in sensitivity.linears}, bits, share)


def block_of(fqn: str) -> int:
    """The decoder block a linear belongs to: N of `....layers.N....`."""
    index = fqn.partition(".layers.")[2].partition(".")[0]
    if not index.isdigit():
        raise ValueError(f"linear {fqn}: not inside a decoder block (no `.layers.N.` in its name)")
    return int(index)


def blocks(sensitivity: Sensitivity) -> int:
    """How many decoder blocks the measured linears are in."""
    return 1 + max(block_of(fqn) for fqn in sensitivity.linears)


def smallest(sensitivity: Sensitivity) -> str:
    """The candidate with the fewest bytes over every linear it serves (the heuristic's default rest)."""
    linears = sensitivity.linears.values()
    return min(sensitivity.candidates, key=lambda label: sum(
        linear.options[label].bytes if label in linear.options else math.inf for linear in linears))


def first_blocks(sensitivity: Sensitivity, n: int, rest: str, keep: str = BF16) -> "Plan":
    """The heuristic auto is measured against (vllm-omni keeps its first blocks in bf16): every linear of
    the first n decoder blocks runs `keep`, every other one `rest`."""
    if not 0 < n < blocks(sensitivity):
        raise ValueError(f"first {n} blocks: n must be in [1, {blocks(sensitivity)}) for the measured blocks")
    choices = {fqn: keep if block_of(fqn) < n else rest for fqn in sensitivity.linears}
    return Plan(sensitivity, choices, share="type", name=f"first {n} {keep}",
                series=f"first N blocks {keep}, the rest {rest}")


class Plan:
    """A scheme per linear (label: a candidate or "bf16"), checked against the constraints; the
    selector `mxfx.backend(scheme=plan)` takes. Weights not in the sensitivity get None (left alone)."""

    def __init__(self, sensitivity: Sensitivity, choices: dict[str, str], budget: float | None = None,
                 share: str = "activation", name: str = "auto", series: str = "auto"):
        missing = sorted(set(sensitivity.linears) - set(choices))
        unknown = sorted(set(choices) - set(sensitivity.linears))
        if missing or unknown:
            problems = [f"{what} {names[0]} ({len(names)} such)" for what, names in (("missing", missing),
                                                                                  ("unknown", unknown)) if names]
            raise ValueError(f"a plan names every measured linear: {'; '.join(problems)}")
        for fqn, label in choices.items():
            if label not in sensitivity.linears[fqn].options:
                raise ValueError(f"linear {fqn}: {label!r} is not one of its options "
                                 f"({', '.join(sensitivity.linears[fqn].options)})")
        for group in sensitivity.groups:
            options = [sensitivity.linears[m].options[choices[m]] for m in group]
            keys = {(o.activation, o.scheme if share == "type" else None) for o in options}
            if len(keys) > 1:
                raise ValueError(f"linears {', '.join(group)} share an activation but would quantize it in "
                                 f"{len(keys)} ways ({', '.join(choices[m] for m in group)}; share={share!r})")
        self.sensitivity, self.choices, self.budget, self.share = sensitivity, choices, budget, share
        self.name, self.series = name, series  # series: the curve a plot draws it on (bits vs perplexity)

    @property
    def bytes(self) -> int:
        return sum(self.sensitivity.linears[fqn].options[label].bytes for fqn, label in self.choices.items())

    @property
    def bits(self) -> float:
        return 8 * self.bytes / self.sensitivity.elements

    @property
    def kl(self) -> float:
        return sum(self.sensitivity.linears[fqn].options[label].kl for fqn, label in self.choices.items())

    @property
    def label(self) -> str:
        return f"{self.name} ({self.bits:.2f} bits)"

    def scheme_for(self, weight: torch.Tensor) -> Scheme | None:
        fqn = self.sensitivity.fqn_of(weight)
        return None if fqn is None else self.sensitivity.scheme(fqn, self.choices[fqn])

    def schemes(self) -> dict[str, Scheme | None]:
        """fqn -> the chosen scheme value (None: bf16)."""
        return {fqn: self.sensitivity.scheme(fqn, label) for fqn, label in self.choices.items()}

    def __str__(self) -> str:
        labels = [BF16, *self.sensitivity.candidates]
        header = ("linear", "K", "N", "choice", *(f"KL {label}" for label in labels[1:]), "bytes")
        rows = []
        for fqn, label in self.choices.items():
            linear = self.sensitivity.linears[fqn]
            rows.append((fqn, str(linear.k), str(linear.n), label,
                         *(f"{linear.options[c].kl:.3g}" if c in linear.options else "-" for c in labels[1:]),
                         f"{linear.options[label].bytes:,}"))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        budget = f" (budget {self.budget} bits)" if self.budget is not None else ""
        lines = [f"mxfx auto: {self.bits:.4f} bits per weight element{budget}, {self.bytes:,} bytes over "
                 f"{self.sensitivity.elements:,} elements; summed KL {self.kl:.4g} nats/token; share={self.share}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        return "\n".join(lines)


def measured(path: str | Path | None, model: torch.nn.Module, batches: Sequence[torch.Tensor],
             calibration: Calibration | None = None, candidates: Sequence[str] | None = None,
             progress: bool | None = None) -> Sensitivity:
    """`measure`, cached in the file `path`: read when it holds this model's, these batches' and these
    candidates' measurement, else measured and written there."""
    batches = list(batches)
    if path is not None and Path(path).is_file():
        cached = Sensitivity.load(path, model, calibration)
        wanted = candidates or (RECOVERED_CANDIDATES if calibration is not None else PLAIN_CANDIDATES)
        if cached.batches_fingerprint == _fingerprint(batches) and cached.candidates == tuple(wanted):
            return cached
    sensitivity = measure(model, batches, calibration, candidates, progress=progress)
    if path is not None:
        sensitivity.save(path)
    return sensitivity


def auto(bits: float | None, calibration) -> Plan:
    """What `mxfx.backend(scheme="auto", bits=B, calibration=sensitivity)` compiles with."""
    if bits is None:
        raise ValueError("scheme='auto' needs bits= (the average bits per weight element, e.g. 4.5)")
    if not isinstance(calibration, Sensitivity):
        raise ValueError("scheme='auto' needs calibration=mxfx.mixed_precision.measure(model, batches[, calibration]) "
                         f"(the sensitivities measured on the model), got {type(calibration).__name__}")
    return solve(calibration, bits)

"""Accuracy-recovery recipes as scheme values: smoothing, block rotation, GPTQ and the MSE scale search,
each a transform the NPU and the reference target run identically.

`apply(scheme, recipe, calibration, model)` returns a selector for `mxfx.backend(scheme=...)`: each linear
of `model` gets a `Recovered` scheme, a frozen value holding the base scheme, the recipe and its own
constants (the smooth scale by content, the Gram matrix by calibration identity), so prepared-weight
caches and activation sharing key on it like on any scheme. Per linear, in real arithmetic:

    y = ((x * s) A) (((W / s) A^-T))^T = x W^T

with s the smoothing scale (bf16, as the kernel multiplies) and A the block-diagonal rotation whose
blocks are exact in bf16 (mxfx.recovery.rotation). The weight is transformed in fp32 at preparation,
cast to the activation dtype, and quantized by the base scheme's quantizer, or by GPTQ / the scale
search on the same grid. Activations: x*s inside npu_dynamic_dual_level_mx_quant(smooth_scale=s) on
the dual-level scheme without rotation, else an aten.mul in the activation dtype before it; the rotation
is aten.bmm over the K/b blocks (bf16 in, fp32 accumulation, one rounding to bf16: what the NPU's and
CPU's bf16 GEMMs compute, up to summation order) before the quantizer.
"""

import dataclasses
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from mxfx.calibration import Calibration, InputStats
from mxfx.recovery.gptq import gptq, round_to_nearest
from mxfx.recovery.grids import DualLevelGrid, SingleLevelGrid
from mxfx.recovery.rotation import BlockRotation, rotate
from mxfx.recovery.smoothing import smooth_scale
from mxfx.schemes import MXFP4W4A8, MXFP8, DualLevelMXFP4, Scheme, get_scheme, target_ops, tensor_key
from mxfx.targets import get_target

aten = torch.ops.aten


@dataclass(frozen=True)
class Recipe:
    """smooth_alpha: SmoothQuant migration strength (None: no smoothing; "search": per activation, the one of
    SEARCHED_ALPHAS, or no smoothing, with the least quantized output error on the calibration's sample);
    rotation: a block rotation (None: none); gptq: GPTQ codes (else round to nearest); scale_search: "floor"
    (the kernel's rule) or "mse" (per 32-block, floor exponent or one up); damp: GPTQ's relative diagonal
    damping."""

    smooth_alpha: float | str | None = None
    rotation: BlockRotation | None = None
    gptq: bool = False
    scale_search: str = "floor"
    damp: float = 0.01

    def __post_init__(self):
        if isinstance(self.smooth_alpha, str) and self.smooth_alpha != "search":
            raise ValueError(f"smooth_alpha must be a number in [0, 1], 'search' or None, got {self.smooth_alpha!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.smooth_alpha is not None or self.gptq or self.scale_search != "floor"


RECIPES = {
    "smooth": Recipe(smooth_alpha=0.5),
    "rotate": Recipe(rotation=BlockRotation(32)),
    "gptq": Recipe(gptq=True),
    "smooth+gptq": Recipe(smooth_alpha=0.5, gptq=True),
    "rotate+gptq": Recipe(rotation=BlockRotation(32), gptq=True),
    "smooth+rotate+gptq": Recipe(smooth_alpha=0.5, rotation=BlockRotation(32), gptq=True),
    "smooth-search": Recipe(smooth_alpha="search"),
    "smooth-search+gptq": Recipe(smooth_alpha="search", gptq=True),
    "smooth-search+rotate+gptq": Recipe(smooth_alpha="search", rotation=BlockRotation(32), gptq=True),
    "mse": Recipe(scale_search="mse"),
    "gptq+mse": Recipe(gptq=True, scale_search="mse"),
}
SEARCHED_ALPHAS = tuple(i / 10 for i in range(11))  # smooth_alpha="search" also tries no smoothing
# per base scheme, chosen by measurement (README: accuracy recovery); a rotation is recommended only where it
# pays for what it costs on the NPU (an online bmm, and the norm + quant fusion it prevents); the searched
# smoothing where outlier channels make the plain recipe fall apart (README: the outlier model)
RECOMMENDED = {
    "mxfp4_dual": "smooth-search+rotate+gptq",
    "mxfp4_w4a8": "smooth-search+gptq",
    "mxfp8": "gptq",
}


def get_recipe(recipe: "str | Recipe", scheme: Scheme) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe == "recommended" and scheme.name not in RECOMMENDED:
        raise ValueError(f"no recipe is recommended for {scheme.name} yet (none measured); "
                         f"name one of {', '.join(RECIPES)}")
    name = RECOMMENDED[scheme.name] if recipe == "recommended" else recipe
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join([*RECIPES, 'recommended'])}")
    return RECIPES[name]


@dataclass(frozen=True, eq=False)
class Constant:
    """A tensor inside a scheme value, equal to and hashed as its content."""

    tensor: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "key", tensor_key(self.tensor))

    def __eq__(self, other):
        return isinstance(other, Constant) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


@dataclass(frozen=True, eq=False)
class GramOf:
    """An input's Gram matrix inside a scheme value, equal by the calibration's identity and the input."""

    calibration: Calibration
    linear: str

    def __eq__(self, other):
        return isinstance(other, GramOf) and (self.calibration, self.linear) == (other.calibration, other.linear)

    def __hash__(self):
        return hash((id(self.calibration), self.linear))

    @property
    def gram(self) -> torch.Tensor:
        return self.calibration.stats(self.linear).gram


@dataclass(frozen=True)
class Recovered(Scheme):
    """`base` with `recipe` applied to one linear of input width k (smooth: its bf16 scale [K]; gram:
    its input's Gram matrix, for GPTQ and the weighted scale search). stored=True (with a stored base):
    a recovered checkpoint's linear (stored_transforms), whose codes come from the checkpoint and whose
    activation runs the smoothing and rotation it stored."""

    base: Scheme = dataclasses.field(default_factory=DualLevelMXFP4)
    recipe: Recipe = Recipe()
    k: int = 0
    smooth: Constant | None = None
    gram: GramOf | None = None

    @property
    def name(self):
        return self.base.name

    @property
    def description(self):
        return f"{self.base.description} with {self.recipe}"

    @property
    def k_multiple(self):
        return self.base.k_multiple

    @property
    def label(self):
        if self.stored:  # the checkpoint's codes: only the activation's transforms are known
            steps = [step for step, on in (("smooth", self.smooth), ("rotate", self.recipe.rotation)) if on]
            return f"{self.base.label}+{'+'.join(steps)}"
        return f"{self.base.label}+{recipe_name(self.recipe)}"

    @property
    def activation_constants(self) -> tuple[str, ...]:
        return tuple(name for name, on in (("smooth_scale", self.smooth), ("rotation", self.recipe.rotation)) if on)

    # -- weights -----------------------------------------------------------------------------------
    def _rotation(self, dtype: torch.dtype, weight: bool) -> torch.Tensor:
        rotation = self.recipe.rotation
        return (rotation.weight_blocks(self.k) if weight else rotation.activation_blocks(self.k)).to(dtype)

    def transformed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(W / s) A^-T in fp32 (A^-T = A for the orthogonal blocks of the exact Hadamard)."""
        w = weight.float()
        if self.smooth is not None:
            w = w / self.smooth.tensor.float()
        if self.recipe.rotation is not None:
            w = rotate(w, self._rotation(torch.float32, weight=True))
        return w

    def original_weight(self, transformed: torch.Tensor) -> torch.Tensor:
        """The inverse of transformed_weight, fp32: ((W / s) A^-T) A^T s = W (a stored linear's weight as the
        model holds it, so that x W^T is what its codes compute before quantization)."""
        w = transformed.float()
        if self.recipe.rotation is not None:
            w = rotate(w, self._rotation(torch.float32, weight=False).transpose(-1, -2))
        if self.smooth is not None:
            w = w * self.smooth.tensor.float()
        return w

    def transformed_gram(self) -> torch.Tensor:
        """The Gram matrix of the activation the quantizer sees, (x s A)^T (x s A), fp64."""
        h = self.gram.gram.double()
        if self.smooth is not None:
            s = self.smooth.tensor.double()
            h = h * s.unsqueeze(0) * s.unsqueeze(1)
        if self.recipe.rotation is not None:
            a = self._rotation(torch.float64, weight=False)
            h = rotate(rotate(h, a).T, a)  # A^T H A (H symmetric)
        return h

    def _grid(self, n: int, column_weight):
        search = self.recipe.scale_search
        if isinstance(self.base, DualLevelMXFP4):
            return DualLevelGrid(n, self.k, search, column_weight)
        if isinstance(self.base, MXFP4W4A8):
            return SingleLevelGrid(n, self.k, "fp4_e2m1", search, column_weight)
        if isinstance(self.base, MXFP8):
            return SingleLevelGrid(n, self.k, "fp8_e4m3", search, column_weight)
        raise ValueError(f"recipes serve mxfp4_dual, mxfp4_w4a8 and mxfp8, not {self.base.label}")

    def quantize_weight(self, target, weight):
        w = self.transformed_weight(weight).to(weight.dtype)
        if not self.recipe.gptq and self.recipe.scale_search == "floor":
            return self.base.quantize_weight(target, w)
        h = self.transformed_gram() if self.gram is not None else None
        grid = self._grid(w.shape[0], None if h is None else torch.diagonal(h).float())
        if self.recipe.gptq:
            gptq(w, h, grid, self.recipe.damp)
        else:
            round_to_nearest(w, grid)
        return {name: t.to(weight.device) for name, t in grid.result().items()}

    def layout(self, target, codes, bias, dtype):
        prepared = dict(self.base.layout(target, codes, bias, dtype))
        if self.smooth is not None:
            prepared["smooth_scale"] = self.smooth.tensor.to(dtype)
        if self.recipe.rotation is not None:
            prepared["rotation"] = self._rotation(dtype, weight=False)
        return prepared

    # -- activations and the matmul ----------------------------------------------------------------
    @property
    def activation_rule(self) -> Hashable:
        """The base's when the recipe changes only the weights (GPTQ, the scale search): such a linear
        shares its activation's quantization with plain-scheme siblings."""
        if not self.activation_constants:
            return self.base.activation_rule
        return (self.base.activation_rule, self.activation_constants)

    def quantize_activation(self, target, x2d, prepared):
        rotation = self.recipe.rotation
        fused_smooth = self.smooth is not None and rotation is None and isinstance(self.base, DualLevelMXFP4)
        if self.smooth is not None and not fused_smooth:
            x2d = aten.mul.Tensor(x2d, prepared["smooth_scale"])
        if rotation is not None:
            blocks = aten.bmm.default(aten.transpose.int(aten.reshape.default(x2d, [-1, self.k // rotation.block,
                                                                                    rotation.block]), 0, 1),
                                      prepared["rotation"])
            x2d = aten.reshape.default(aten.transpose.int(blocks, 0, 1), [-1, self.k])
        if fused_smooth:
            return target_ops(target).npu_dynamic_dual_level_mx_quant(x2d, smooth_scale=prepared["smooth_scale"])
        return self.base.quantize_activation(target, x2d, prepared)

    def matmul(self, target, activation, prepared, dtype):
        return self.base.matmul(target, activation, prepared, dtype)


def stored_transforms(base: Scheme, k: int, smooth: torch.Tensor | None,
                      rotation: BlockRotation | None) -> Scheme:
    """The scheme of a checkpoint linear stored as `base` (a stored scheme) whose activation is smoothed by
    `smooth` [K] (x * smooth, in the activation dtype) and/or rotated by `rotation` first: `base` itself when
    it has neither. The stored codes are the transformed weight's (whatever recipe chose them)."""
    if smooth is None and rotation is None:
        return base
    return Recovered(base=base, recipe=Recipe(rotation=rotation), k=k,
                     smooth=None if smooth is None else Constant(smooth), stored=True)


@torch.no_grad()
def searched_smooth(base: Scheme, recipe: Recipe, stats: InputStats, weights: list[torch.Tensor]) -> Constant | None:
    """The smooth scale of one activation (None: no smoothing) among SEARCHED_ALPHAS' and none, minimizing
    sum_i ||Q(x s) Q(W_i / s)^T - x W_i^T||^2 / ||x W_i^T||^2 over the linears W_i reading it, x the
    calibration's sample: each candidate run through the scheme's own quantizers (round to nearest, with the
    recipe's rotation). Each linear's error is relative to its output's energy: on the outlier model v_proj's
    output is 100x q_proj's in energy, so the plain sum chose what suits v and cost q/k 5x their error
    (+11.7% perplexity against +4.0% with alpha 0.5), while what q/k and v pass on is relative (q_norm,
    k_norm, and the scale o_proj's weight carries)."""
    name = stats.members[0]
    if stats.sample is None:
        raise ValueError(f"linear {name}: the smoothing's alpha search needs a sample of its input's rows, which "
                         "the calibration lacks (calibrate again: mxfx.calibrate keeps one unless sample_rows=0)")
    target, x, dtype = get_target("reference"), stats.sample, weights[0].dtype
    exact = [x.float() @ w.float().T for w in weights]
    energy = [y.square().sum().clamp(min=torch.finfo(torch.float32).tiny).item() for y in exact]
    candidates = [None, *(Constant(smooth_scale(stats.amax, weights, alpha).to(dtype)) for alpha in SEARCHED_ALPHAS)]

    def error(smooth: Constant | None) -> float:
        scheme = Recovered(base=base, recipe=Recipe(rotation=recipe.rotation), k=stats.k, smooth=smooth)
        outputs = (scheme.linear(target, x, scheme.prepare(target, w, None, x.dtype)) for w in weights)
        return sum((y_q.float() - y).square().sum().item() / e for y_q, y, e in zip(outputs, exact, energy))

    errors = [error(smooth) for smooth in candidates]
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]


def recipe_name(recipe: Recipe) -> str:
    return next((name for name, value in RECIPES.items() if value == recipe), repr(recipe))


class RecipeSelector:
    """Each weight of the model the recipe was applied to -> its Recovered scheme; other weights -> None
    (left alone, reported as such)."""

    def __init__(self, base: Scheme, recipe: Recipe, schemes: WeakIdKeyDictionary):
        self.base, self.recipe, self._schemes = base, recipe, schemes

    @property
    def label(self) -> str:
        return f"{self.base.label}+{recipe_name(self.recipe)}"

    def scheme_for(self, weight: torch.Tensor) -> Scheme | None:
        return self._schemes.get(weight)

    def schemes(self) -> list[Scheme]:
        return list(self._schemes.values())


def serves(scheme: "str | Scheme") -> bool:
    """Whether recipes apply to the scheme: the online MX schemes (not stored codes, not single-level W4A4)."""
    base = get_scheme(scheme)
    return isinstance(base, (DualLevelMXFP4, MXFP4W4A8, MXFP8)) and not base.stored


def check_scheme(scheme: "str | Scheme") -> Scheme:
    """The scheme, unless recipes cannot serve it."""
    base = get_scheme(scheme)
    if not serves(base):
        raise ValueError(f"recipes apply to the online schemes mxfp4_dual, mxfp4_w4a8 and mxfp8, not {base.label}")
    return base


def check_recipe(scheme: "str | Scheme", recipe: "str | Recipe", calibration: Calibration | None) -> tuple:
    """(base scheme, recipe) after refusing what cannot run: a recipe a scheme does not serve, a calibrated
    recipe without a calibration."""
    base = check_scheme(scheme)
    recipe = get_recipe(recipe, base)
    if recipe.needs_calibration and calibration is None:
        raise ValueError(f"recipe {recipe_name(recipe)} needs a calibration (mxfx.calibrate(model, batches))")
    return base, recipe


@torch.no_grad()
def select(scheme: "str | Scheme", recipe: "str | Recipe", calibration: Calibration | None,
           weights: Mapping[str, torch.Tensor]) -> RecipeSelector:
    """The selector running `scheme` with `recipe` on the linears `weights` (FQN -> weight [N, K], by
    identity): a model's (apply) or one graph's (the backend). Each linear is checked against the
    calibration (its statistics and shape); the linears sharing its input must be among `weights`."""
    base, recipe = check_recipe(scheme, recipe, calibration)
    schemes = WeakIdKeyDictionary()
    smooth: dict[str, Constant] = {}
    for name, weight in weights.items():
        k = weight.shape[1]
        if base.skip(k) is not None:  # the rewrite skips it for its K: keep the base scheme's reason
            schemes[weight] = base
            continue
        if recipe.rotation is not None:
            recipe.rotation.check(k, name)
        stats = None
        if recipe.needs_calibration:
            calibration.check_linear(name, tuple(weight.shape))
            stats = calibration.stats(name)
        if recipe.gptq and stats.gram is None:
            raise ValueError(f"linear {name}: GPTQ needs the Gram matrix, which the calibration lacks "
                             "(calibrate with gram=True)")
        if recipe.smooth_alpha is not None and stats.members[0] not in smooth:
            missing = [member for member in stats.members if member not in weights]
            if missing:
                raise ValueError(f"linear {name}: the smoothing of its input needs the weights of {missing}, "
                                 "which read the same input but are not given")
            members = [weights[member] for member in stats.members]
            if recipe.smooth_alpha == "search":
                smooth[stats.members[0]] = searched_smooth(base, recipe, stats, members)
            else:
                smooth[stats.members[0]] = Constant(smooth_scale(stats.amax, members, recipe.smooth_alpha)
                                                    .to(weight.dtype))
        schemes[weight] = Recovered(
            base=base, recipe=recipe, k=k,
            smooth=smooth.get(stats.members[0]) if recipe.smooth_alpha is not None else None,
            # keyed by the input, not the linear: siblings (one Gram matrix) get equal schemes, so they merge
            gram=GramOf(calibration, stats.members[0]) if stats is not None and stats.gram is not None else None,
        )
    return RecipeSelector(base, recipe, schemes)


def apply(scheme: "str | Scheme", recipe: "str | Recipe", calibration: Calibration | None,
          model: torch.nn.Module) -> RecipeSelector:
    """The selector running `scheme` with `recipe` on `model`'s linears (their weights, by identity).
    calibration: from mxfx.calibration.calibrate on this model (checked against it); rotation alone
    needs none."""
    base, recipe = check_recipe(scheme, recipe, calibration)
    if recipe.needs_calibration:
        calibration.check(model)
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return select(base, recipe, calibration, weights)

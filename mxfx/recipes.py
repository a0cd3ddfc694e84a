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
the dual-level scheme without rotation, else an aten.mul in the activation dtype before it. The rotation:
on the single-level schemes one npu_rotate_quant (x A and the MX quantization in one op: fp32
accumulation, one rounding to bf16, then npu_dynamic_mx_quant's rules); on the dual-level scheme, and on a
target that lacks npu_rotate_quant (torchair GE), aten.bmm over the K/b blocks (bf16 in, fp32 accumulation,
one rounding to the activation dtype) before the quantizer. For bf16 activations both compute the same
bits, up to the GEMMs' summation order.

The per-head rotation of o_proj's input folds offline (`fold_rotations`): attention mixes tokens, not
channels, so with v_proj's rows rotated per head, A^T W_v (and its bias b A), attention's output is already
o A, and o_proj keeps its weight W_o A^-T with no online rotation. It needs the same b x b blocks at every
head position (with GQA a kv head serves several heads), b dividing head_dim, and head_dim read from the
model (never guessed from shapes).
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
from mxfx.schemes import MXFP4, MXFP4W4A8, MXFP8, DualLevelMXFP4, Scheme, get_scheme, target_ops, tensor_key
from mxfx.targets import get_target

aten = torch.ops.aten
SINGLE_LEVEL = (MXFP4W4A8, MXFP8, MXFP4)  # npu_dynamic_mx_quant activations: npu_rotate_quant rotates and quantizes


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
# pays for what it costs on the NPU (an online bmm or npu_rotate_quant, and the fusions it prevents); the
# searched smoothing where outlier channels make the plain recipe fall apart (README: the outlier model)
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
    activation runs the smoothing and rotation it stored. The offline fold of o_proj's rotation
    (fold_rotations): fold_input (o_proj: the weight is rotated, the activation arrives rotated) and
    head_rotation (v_proj: one head's blocks [head_dim/b, b, b], its rows rotated per kv head)."""

    base: Scheme = dataclasses.field(default_factory=DualLevelMXFP4)
    recipe: Recipe = Recipe()
    k: int = 0
    smooth: Constant | None = None
    gram: GramOf | None = None
    fold_input: bool = False
    head_rotation: Constant | None = None

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
            steps = [step for step, on in (("smooth", self.smooth), ("rotate", self.online_rotation)) if on]
            return f"{self.base.label}+{'+'.join(steps)}"
        fold = (" (input rotation folded offline)" if self.fold_input else
                " (output rows rotated per head)" if self.head_rotation is not None else "")
        return f"{self.base.label}+{recipe_name(self.recipe)}{fold}"

    @property
    def online_rotation(self) -> BlockRotation | None:
        """The rotation the activation runs through online (None where none, or where it is folded)."""
        return None if self.fold_input else self.recipe.rotation

    @property
    def activation_constants(self) -> tuple[str, ...]:
        return tuple(name for name, on in (("smooth_scale", self.smooth), ("rotation", self.online_rotation)) if on)

    # -- weights -----------------------------------------------------------------------------------
    def _rotation(self, dtype: torch.dtype, weight: bool) -> torch.Tensor:
        rotation = self.recipe.rotation
        return (rotation.weight_blocks(self.k) if weight else rotation.activation_blocks(self.k)).to(dtype)

    def transformed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(W / s) A^-T in fp32 (A^-T = A for the orthogonal blocks of the exact Hadamard); with a head
        rotation R, R^T ((W / s) A^-T), the rows rotated."""
        w = weight.float()
        if self.smooth is not None:
            w = w / self.smooth.tensor.float()
        if self.recipe.rotation is not None:
            w = rotate(w, self._rotation(torch.float32, weight=True))
        if self.head_rotation is not None:
            w = rotate_heads(w.T, self.head_rotation.tensor).T
        return w

    def output_bias(self, bias):
        """b R with a head rotation (computed in fp32, in the bias's dtype, as a checkpoint stores it), else b."""
        if self.head_rotation is None or bias is None:
            return bias
        return rotate_heads(bias.float(), self.head_rotation.tensor).to(bias.dtype)

    def original_weight(self, transformed: torch.Tensor) -> torch.Tensor:
        """The inverse of transformed_weight, fp32: ((W / s) A^-T) A^T s = W (a stored linear's weight as the
        model holds it, so that x W^T is what its codes compute before quantization; a stored linear has no
        head rotation: its codes hold the rotated rows)."""
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

    def fake_codes(self, target, weight, dtype, fake_mode):
        """The grid's codes have the base quantizer's shapes and dtypes (GPTQ does not run on fakes)."""
        if self.stored:
            return super().fake_codes(target, weight, dtype, fake_mode)
        return self.base.fake_codes(target, weight, dtype, fake_mode)

    def layout(self, target, codes, bias, dtype):
        prepared = dict(self.base.layout(target, codes, bias, dtype))
        if self.smooth is not None:
            prepared["smooth_scale"] = self.smooth.tensor.to(dtype)
        if self.online_rotation is not None:
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
        rotation = self.online_rotation
        fused_smooth = self.smooth is not None and rotation is None and isinstance(self.base, DualLevelMXFP4)
        if self.smooth is not None and not fused_smooth:
            x2d = aten.mul.Tensor(x2d, prepared["smooth_scale"])
        if rotation is not None and isinstance(self.base, SINGLE_LEVEL) and target.emits("npu_rotate_quant"):
            return target_ops(target).npu_rotate_quant(
                x2d, prepared["rotation"], dst_dtype=self.base.activation_dst_type,
                round_mode=self.base.activation_round_mode)
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


def rotate_heads(t: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """t [..., N] times the block-diagonal rotation of one head's blocks `head` [head_dim/b, b, b] repeated over
    the N/head_dim heads, in t's dtype (v_proj's rows: R^T W = (W^T R)^T; its bias: b R)."""
    return rotate(t, head.repeat(t.shape[-1] // (head.shape[0] * head.shape[-1]), 1, 1))


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


# transformers' attention modules whose forward passes v_proj's output straight to the attention product
# (per head, mixing tokens only; a KV cache stores it as computed) and o_proj reads that product's heads
FOLDABLE_ATTENTION = ("Qwen3Attention", "Qwen3MoeAttention", "Qwen2Attention", "LlamaAttention", "MistralAttention")


@dataclass(frozen=True)
class Attention:
    """An attention module's value and output projections (FQNs) and head size; head_dim None: why it is not
    known to fold."""

    v_proj: str
    o_proj: str
    head_dim: int | None
    why: str = ""


def attentions(model: torch.nn.Module) -> list[Attention]:
    """The model's attention modules with nn.Linear v_proj and o_proj children; head_dim from the module
    (transformers sets it from the config), for the classes known to fold (FOLDABLE_ATTENTION)."""
    found = []
    for name, module in model.named_modules():
        v, o = getattr(module, "v_proj", None), getattr(module, "o_proj", None)
        if not (isinstance(v, torch.nn.Linear) and isinstance(o, torch.nn.Linear)):
            continue
        prefix = f"{name}." if name else ""
        kind, head_dim = type(module).__name__, getattr(module, "head_dim", None)
        why = (f"attention class {kind} is not known to pass v_proj's output straight to attention"
               if kind not in FOLDABLE_ATTENTION else
               "" if isinstance(head_dim, int) else f"{kind} has no integer head_dim")
        found.append(Attention(f"{prefix}v_proj", f"{prefix}o_proj", None if why else head_dim, why))
    return found


@dataclass(frozen=True)
class RotationFold:
    """o_proj's input rotation moved offline into v_proj's output rows (folded), or why it stays online."""

    o_proj: str
    v_proj: str
    head_dim: int | None
    folded: bool
    reason: str = ""

    def __str__(self) -> str:
        what = "folded into v_proj's rows" if self.folded else f"online: {self.reason}"
        return f"{self.o_proj}: input rotation {what}"


NO_MODEL = ("o_proj's input rotation runs online: this selector was built from a graph's linears, which do not "
            "say head_dim; build it from the model (recipes.apply(scheme, recipe, calibration, model)) to fold it")


def fold_rotations(base: Scheme, recipe: Recipe, weights: Mapping[str, torch.Tensor],
                   found: list[Attention]) -> list[RotationFold]:
    """Which o_proj input rotations fold into their v_proj (`weights`: the recipe's linears, FQN -> weight;
    only shapes are read): both quantized by the recipe, o_proj's input not smoothed (a per-channel scale of
    every head cannot move into a v head that GQA shares), b dividing head_dim, the shapes whole heads, and
    the same blocks at every head position (Hadamard; seeded random blocks differ per position)."""
    rotation = recipe.rotation
    folds = []
    for a in found:
        o = weights.get(a.o_proj)
        if rotation is None or o is None or base.skip(o.shape[1]) is not None:
            continue  # o_proj is not rotated: nothing to fold
        v, k = weights.get(a.v_proj), o.shape[1]
        reason = (a.why if a.head_dim is None else
                  f"{a.v_proj} is not quantized by the recipe" if v is None or base.skip(v.shape[1]) is not None else
                  "o_proj's input is smoothed before its rotation" if recipe.smooth_alpha is not None else
                  f"rotation block {rotation.block} does not divide head_dim {a.head_dim}"
                  if a.head_dim % rotation.block else
                  f"K={k} or v_proj's N={v.shape[0]} is not whole heads of {a.head_dim}"
                  if k % a.head_dim or v.shape[0] % a.head_dim else "")
        if not reason:
            blocks = rotation.activation_blocks(k).reshape(k // a.head_dim, a.head_dim // rotation.block,
                                                           rotation.block, rotation.block)
            if not torch.equal(blocks, blocks[:1].expand_as(blocks)):
                reason = f"the {rotation.kind} blocks differ between head positions"
        folds.append(RotationFold(a.o_proj, a.v_proj, a.head_dim, not reason, reason))
    return folds


class RecipeSelector:
    """Each weight of the model the recipe was applied to -> its Recovered scheme; other weights -> None
    (left alone, reported as such). folds: the o_proj rotations folded or not (None: the selector could not
    tell, NO_MODEL)."""

    def __init__(self, base: Scheme, recipe: Recipe, schemes: WeakIdKeyDictionary,
                 folds: "list[RotationFold] | None" = None):
        self.base, self.recipe, self._schemes, self.folds = base, recipe, schemes, folds

    def fold_report(self, linears: set[str]) -> list[str]:
        """The folds of `linears` (one graph's), as report lines."""
        if self.folds is None:
            return [NO_MODEL] if self.recipe.rotation is not None else []
        return [str(f) for f in self.folds if f.o_proj in linears]

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
           weights: Mapping[str, torch.Tensor], folds: "list[RotationFold] | None" = None) -> RecipeSelector:
    """The selector running `scheme` with `recipe` on the linears `weights` (FQN -> weight [N, K], by
    identity): a model's (apply) or one graph's (the backend). Each linear is checked against the
    calibration (its statistics and shape); the linears sharing its input must be among `weights`.
    folds (fold_rotations; None: unknown, nothing folds): the o_proj rotations that fold into v_proj."""
    base, recipe = check_recipe(scheme, recipe, calibration)
    schemes = WeakIdKeyDictionary()
    smooth: dict[str, Constant] = {}
    folded = {f.o_proj: f for f in folds or () if f.folded}
    heads = {f.v_proj: f for f in folded.values()}
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
        # v_proj of a fold: one head's blocks (fold_rotations checked that they repeat per head position)
        head = Constant(recipe.rotation.activation_blocks(heads[name].head_dim)) if name in heads else None
        schemes[weight] = Recovered(
            base=base, recipe=recipe, k=k,
            smooth=smooth.get(stats.members[0]) if recipe.smooth_alpha is not None else None,
            # keyed by the input, not the linear: siblings (one Gram matrix) get equal schemes, so they merge
            gram=GramOf(calibration, stats.members[0]) if stats is not None and stats.gram is not None else None,
            fold_input=name in folded, head_rotation=head,
        )
    return RecipeSelector(base, recipe, schemes, folds)


def apply(scheme: "str | Scheme", recipe: "str | Recipe", calibration: Calibration | None,
          model: torch.nn.Module) -> RecipeSelector:
    """The selector running `scheme` with `recipe` on `model`'s linears (their weights, by identity).
    calibration: from mxfx.calibrate on this model (checked against it); rotation alone
    needs none."""
    base, recipe = check_recipe(scheme, recipe, calibration)
    if recipe.needs_calibration:
        calibration.check(model)
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return select(base, recipe, calibration, weights, fold_rotations(base, recipe, weights, attentions(model)))

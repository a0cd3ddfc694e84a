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
from typing import ClassVar

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
    head_rotation (v_proj: one head's blocks [head_dim/b, b, b], its rows rotated per kv head). The offline
    fold of down_proj's smoothing (fold_smoothings): smooth_folded (down_proj: the weight is W / s, the
    activation arrives smoothed) and row_scale (up_proj: its rows, and bias, times down_proj's s [N])."""

    base: Scheme = dataclasses.field(default_factory=DualLevelMXFP4)
    recipe: Recipe = Recipe()
    k: int = 0
    smooth: Constant | None = None
    gram: GramOf | None = None
    fold_input: bool = False
    head_rotation: Constant | None = None
    smooth_folded: bool = False
    row_scale: Constant | None = None

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
        folds = [note for note, on in (("input rotation folded offline", self.fold_input),
                                       ("output rows rotated per head", self.head_rotation is not None),
                                       ("input smoothing folded offline", self.smooth_folded),
                                       ("output rows smoothed for down_proj", self.row_scale is not None)) if on]
        return f"{self.base.label}+{recipe_name(self.recipe)}" + (f" ({'; '.join(folds)})" if folds else "")

    @property
    def online_rotation(self) -> BlockRotation | None:
        """The rotation the activation runs through online (None where none, or where it is folded)."""
        return None if self.fold_input else self.recipe.rotation

    @property
    def online_smooth(self) -> Constant | None:
        """The smooth scale the activation is multiplied by online (None where none, or where it is folded)."""
        return None if self.smooth_folded else self.smooth

    @property
    def activation_constants(self) -> tuple[str, ...]:
        return tuple(name for name, on in (("smooth_scale", self.online_smooth), ("rotation", self.online_rotation))
                     if on)

    # -- weights -----------------------------------------------------------------------------------
    def _rotation(self, dtype: torch.dtype, weight: bool) -> torch.Tensor:
        rotation = self.recipe.rotation
        return (rotation.weight_blocks(self.k) if weight else rotation.activation_blocks(self.k)).to(dtype)

    def transformed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(W / s) A^-T in fp32 (A^-T = A for the orthogonal blocks of the exact Hadamard); with a head
        rotation R, R^T ((W / s) A^-T), the rows rotated; with a row scale r, diag(r) (W / s) A^-T."""
        w = weight.float()
        if self.smooth is not None:
            w = w / self.smooth.tensor.float()
        if self.recipe.rotation is not None:
            w = rotate(w, self._rotation(torch.float32, weight=True))
        return self.output_rows(w.T).T

    def output_rows(self, t: torch.Tensor) -> torch.Tensor:
        """t [..., N] (a bias, W^T, or the output) with the output rows' folds, in fp32: t R per head, t * r
        (t itself without them)."""
        if self.head_rotation is None and self.row_scale is None:
            return t
        t = t.float()
        if self.head_rotation is not None:
            t = rotate_heads(t, self.head_rotation.tensor)
        if self.row_scale is not None:
            t = t * self.row_scale.tensor.float()
        return t

    def folded_input(self, x: torch.Tensor) -> torch.Tensor:
        """x A (o_proj: v_proj's rotated rows rotate it), x * s (down_proj: up_proj's scaled rows smooth it),
        as the folds compute it upstream, in fp32 then x's dtype; x itself without them."""
        if not (self.fold_input or self.smooth_folded):
            return x
        t = x.float()
        if self.smooth_folded:
            t = t * self.smooth.tensor.float()
        if self.fold_input:
            t = rotate(t, self._rotation(torch.float32, weight=False))
        return t.to(x.dtype)

    def output_bias(self, bias):
        """b R with a head rotation, b * r with a row scale (computed in fp32, in the bias's dtype, as a
        checkpoint stores it), else b."""
        if (self.head_rotation is None and self.row_scale is None) or bias is None:
            return bias
        return self.output_rows(bias.float()).to(bias.dtype)

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
        if self.online_smooth is not None:
            prepared["smooth_scale"] = self.online_smooth.tensor.to(dtype)
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
        rotation, smooth = self.online_rotation, self.online_smooth
        fused_smooth = smooth is not None and smoothing_is_free(self.base, rotation)
        if smooth is not None and not fused_smooth:
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


class _Fold:
    """What the folds share: `pair` (the linear whose input's `what` moves, the linear whose rows take it, named
    by the fields pair_fields) and the report line."""

    what: ClassVar[str]
    pair_fields: ClassVar[tuple[str, str]]

    @property
    def pair(self) -> tuple[str, str]:
        return getattr(self, self.pair_fields[0]), getattr(self, self.pair_fields[1])

    def __str__(self) -> str:
        where = f"folded into {self.pair_fields[1]}'s rows" if self.folded else f"online: {self.reason}"
        return f"{self.pair[0]}: {self.what} {where}"


@dataclass(frozen=True)
class RotationFold(_Fold):
    """o_proj's input rotation moved offline into v_proj's output rows (folded), or why it stays online."""

    o_proj: str
    v_proj: str
    head_dim: int | None
    folded: bool
    reason: str = ""
    what: ClassVar[str] = "input rotation"
    pair_fields: ClassVar[tuple[str, str]] = ("o_proj", "v_proj")


# transformers' MLP modules whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)): down_proj's input
# channel n is up_proj's output channel n times a factor, so a scale of it is a scale of up_proj's row n
FOLDABLE_MLP = ("Qwen3MLP", "Qwen3MoeMLP", "Qwen2MLP", "LlamaMLP", "MistralMLP")


@dataclass(frozen=True)
class MLP:
    """A gated MLP's up and down projections (FQNs); why: why it is not known to fold ("" where it is)."""

    up_proj: str
    down_proj: str
    why: str = ""


def mlps(model: torch.nn.Module) -> list[MLP]:
    """The model's modules with nn.Linear up_proj and down_proj children, with why not for the classes not known
    to fold (FOLDABLE_MLP)."""
    found = []
    for name, module in model.named_modules():
        up, down = getattr(module, "up_proj", None), getattr(module, "down_proj", None)
        if isinstance(up, torch.nn.Linear) and isinstance(down, torch.nn.Linear):
            prefix, kind = f"{name}." if name else "", type(module).__name__
            why = "" if kind in FOLDABLE_MLP else f"MLP class {kind} is not known to multiply up_proj's output into " \
                                                  "down_proj's input channel by channel"
            found.append(MLP(f"{prefix}up_proj", f"{prefix}down_proj", why))
    return found


@dataclass(frozen=True)
class SmoothFold(_Fold):
    """down_proj's input smoothing moved offline into up_proj's output rows (folded), or why it stays online."""

    down_proj: str
    up_proj: str
    folded: bool
    reason: str = ""
    what: ClassVar[str] = "input smoothing"
    pair_fields: ClassVar[tuple[str, str]] = ("down_proj", "up_proj")


NO_MODEL = ("the offline folds (o_proj's input rotation into v_proj's rows, down_proj's input smoothing into "
            "up_proj's) are not made: this selector was built from a graph's linears, which say neither head_dim "
            "nor which linears form an MLP; build it from the model (recipes.apply(scheme, recipe, calibration, "
            "model)) to fold them")


def _decided(recipe: Recipe, smooth: Mapping[str, "Constant | None"], linear: str, what: str) -> None:
    if recipe.smooth_alpha is not None and linear not in smooth:
        raise ValueError(f"linear {linear}: its smoothing must be decided before its {what} can fold")


def smoothing_is_free(base: Scheme, rotation: BlockRotation | None) -> bool:
    """Whether the smoothing costs no op: the dual-level quantizer's smooth_scale input, which an online
    rotation between the two would keep from taking it."""
    return isinstance(base, DualLevelMXFP4) and rotation is None


def fold_rotations(base: Scheme, recipe: Recipe, weights: Mapping[str, torch.Tensor], found: list[Attention],
                   smooth: Mapping[str, "Constant | None"]) -> list[RotationFold]:
    """Which o_proj input rotations fold into their v_proj (`weights`: the recipe's linears, FQN -> weight;
    only shapes are read; `smooth`: the smoothing decided for them, smooth_scales): both quantized by the
    recipe, o_proj's input not smoothed (a per-channel scale of every head cannot move into a v head that GQA
    shares; where the search chose no smoothing for it, it folds), b dividing head_dim, the shapes whole
    heads, and the same blocks at every head position (Hadamard; seeded random blocks differ per position)."""
    rotation = recipe.rotation
    folds = []
    for a in found:
        o = weights.get(a.o_proj)
        if rotation is None or o is None or base.skip(o.shape[1]) is not None:
            continue  # o_proj is not rotated: nothing to fold
        _decided(recipe, smooth, a.o_proj, "rotation")
        v, k = weights.get(a.v_proj), o.shape[1]
        reason = (a.why if a.head_dim is None else
                  f"{a.v_proj} is not quantized by the recipe" if v is None or base.skip(v.shape[1]) is not None else
                  "o_proj's input is smoothed before its rotation" if smooth.get(a.o_proj) is not None else
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


def fold_smoothings(base: Scheme, recipe: Recipe, weights: Mapping[str, torch.Tensor], found: list[MLP],
                    smooth: Mapping[str, "Constant | None"]) -> list[SmoothFold]:
    """Which down_proj input smoothings (x * s) fold into their up_proj's rows (W_up and b_up times s), where
    the smoothing would be an explicit multiply (not on the dual-level scheme without rotation, whose quantizer
    multiplies it for free): the MLP known to fold and up_proj quantized by the recipe (its rows are scaled
    before quantization; the model's weight never is). Exact in real arithmetic: act(g) * (u s) = (act(g) * u)
    s. A rotation of down_proj's input stays online and still follows: the activation is smoothed, then
    rotated (Recovered.quantize_activation), and with the fold it arrives smoothed, then is rotated."""
    folds = []
    for m in found:
        d = weights.get(m.down_proj)
        if recipe.smooth_alpha is None or d is None or base.skip(d.shape[1]) is not None \
                or smoothing_is_free(base, recipe.rotation):
            continue  # no explicit multiply to fold
        _decided(recipe, smooth, m.down_proj, "smoothing")
        if smooth[m.down_proj] is None:
            continue  # the search chose no smoothing
        u = weights.get(m.up_proj)
        reason = (m.why if m.why else
                  f"{m.up_proj} is not quantized by the recipe" if u is None or base.skip(u.shape[1]) is not None else
                  f"{m.up_proj}'s N={u.shape[0]} is not down_proj's K={d.shape[1]}" if u.shape[0] != d.shape[1] else "")
        folds.append(SmoothFold(m.down_proj, m.up_proj, not reason, reason))
    return folds


def fold_dependencies(model: torch.nn.Module) -> list[str]:
    """The linears whose smoothing decides a fold (o_proj's, down_proj's), to decide before the folds."""
    return [*(a.o_proj for a in attentions(model)), *(m.down_proj for m in mlps(model))]


@dataclass
class Folds:
    """The offline folds decided for a model's linears (rotations: o_proj's into v_proj's rows; smoothings:
    down_proj's into up_proj's rows) and the smoothing they were decided on (smooth_scales: linear -> its
    input's scale, None: not smoothed), which select reuses instead of searching again."""

    rotations: list[RotationFold] = dataclasses.field(default_factory=list)
    smoothings: list[SmoothFold] = dataclasses.field(default_factory=list)
    smooth: dict[str, "Constant | None"] = dataclasses.field(default_factory=dict)

    def all(self) -> list["RotationFold | SmoothFold"]:
        return [*self.rotations, *self.smoothings]

    def fields(self, linear: str, rotation: BlockRotation | None) -> dict:
        """The Recovered fields that carry `linear`'s part in the folds made."""
        fields = {}
        for f in self.rotations:
            if f.folded and linear == f.o_proj:
                fields["fold_input"] = True
            if f.folded and linear == f.v_proj:  # one head's blocks (fold_rotations: they repeat per head position)
                fields["head_rotation"] = Constant(rotation.activation_blocks(f.head_dim))
        for f in self.smoothings:
            if f.folded and linear == f.down_proj:
                fields["smooth_folded"] = True
            if f.folded and linear == f.up_proj:
                fields["row_scale"] = self.smooth[f.down_proj]
        return fields


def decide_folds(base: Scheme, recipe: Recipe, weights: Mapping[str, torch.Tensor], model: torch.nn.Module,
                 smooth: Mapping[str, "Constant | None"]) -> Folds:
    """The folds of `model`'s linears `weights` (only shapes are read) once their smoothing is decided."""
    return Folds(fold_rotations(base, recipe, weights, attentions(model), smooth),
                 fold_smoothings(base, recipe, weights, mlps(model), smooth), dict(smooth))


class RecipeSelector:
    """Each weight of the model the recipe was applied to -> its Recovered scheme; other weights -> None
    (left alone, reported as such). folds: the offline folds, made or not (None: the selector could not
    tell, NO_MODEL)."""

    def __init__(self, base: Scheme, recipe: Recipe, schemes: WeakIdKeyDictionary, folds: "Folds | None" = None):
        self.base, self.recipe, self._schemes, self.folds = base, recipe, schemes, folds

    def fold_report(self, linears: set[str]) -> list[str]:
        """The folds of `linears` (one graph's), as report lines."""
        if self.folds is None:
            could = self.recipe.rotation is not None or (self.recipe.smooth_alpha is not None
                                                         and not smoothing_is_free(self.base, self.recipe.rotation))
            return [NO_MODEL] if could else []
        return [str(f) for f in self.folds.all() if f.pair[0] in linears]

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
def smooth_scales(base: Scheme, recipe: Recipe, calibration: Calibration, weights: Mapping[str, torch.Tensor],
                  known: Mapping[str, "Constant | None"] = {}) -> dict[str, "Constant | None"]:
    """Each linear of `weights` (FQN -> weight; the recipe smooths) -> its input's smooth scale (None: the
    search chose none), decided once per input over every linear reading it, which must be among `weights`;
    `known`: scales already decided (kept, not searched again)."""
    smooth = dict(known)
    for name, weight in weights.items():
        if name in smooth:
            continue
        stats = calibration.stats(name)
        missing = [member for member in stats.members if member not in weights]
        if missing:
            raise ValueError(f"linear {name}: the smoothing of its input needs the weights of {missing}, "
                             "which read the same input but are not given")
        members = [weights[member] for member in stats.members]
        scale = (searched_smooth(base, recipe, stats, members) if recipe.smooth_alpha == "search" else
                 Constant(smooth_scale(stats.amax, members, recipe.smooth_alpha).to(weight.dtype)))
        smooth.update(dict.fromkeys(stats.members, scale))
    return smooth


@torch.no_grad()
def select(scheme: "str | Scheme", recipe: "str | Recipe", calibration: Calibration | None,
           weights: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None,
           folds: Folds | None = None) -> RecipeSelector:
    """The selector running `scheme` with `recipe` on the linears `weights` (FQN -> weight [N, K], by
    identity): a model's (apply) or one graph's (the backend). Each linear is checked against the
    calibration (its statistics and shape); the linears sharing its input must be among `weights`. The
    smoothing is decided first, then the offline folds: from `model` (the module `weights` are of), or
    `folds` decided already (the checkpoint writer, which selects one input at a time); neither: nothing
    folds (NO_MODEL)."""
    base, recipe = check_recipe(scheme, recipe, calibration)
    schemes = WeakIdKeyDictionary()
    stats: dict[str, InputStats | None] = {}
    for name, weight in weights.items():
        if base.skip(weight.shape[1]) is not None:  # the rewrite skips it for its K: keep the base's reason
            schemes[weight] = base
            continue
        if recipe.rotation is not None:
            recipe.rotation.check(weight.shape[1], name)
        stats[name] = None
        if recipe.needs_calibration:
            calibration.check_linear(name, tuple(weight.shape))
            stats[name] = calibration.stats(name)
        if recipe.gptq and stats[name].gram is None:
            raise ValueError(f"linear {name}: GPTQ needs the Gram matrix, which the calibration lacks "
                             "(calibrate with gram=True)")
    smooth = {} if recipe.smooth_alpha is None else smooth_scales(
        base, recipe, calibration, {name: weights[name] for name in stats}, {} if folds is None else folds.smooth)
    if folds is None and model is not None:
        folds = decide_folds(base, recipe, weights, model, smooth)
    for name, s in stats.items():
        schemes[weights[name]] = Recovered(
            base=base, recipe=recipe, k=weights[name].shape[1], smooth=smooth.get(name),
            # keyed by the input, not the linear: siblings (one Gram matrix) get equal schemes, so they merge
            gram=GramOf(calibration, s.members[0]) if s is not None and s.gram is not None else None,
            **({} if folds is None else folds.fields(name, recipe.rotation)),
        )
    return RecipeSelector(base, recipe, schemes, folds)


def apply(scheme: "str | Scheme", recipe: "str | Recipe", calibration: Calibration | None,
          model: torch.nn.Module, fold: bool = True) -> RecipeSelector:
    """The selector running `scheme` with `recipe` on `model`'s linears (their weights, by identity), with
    the offline folds the model allows (fold=False: none, for a selector whose linears are used one by one,
    as mixed precision measures and combines them: each linear of a folded pair is right only with the
    other). calibration: from mxfx.calibrate on this model (checked against it); rotation alone needs none."""
    base, recipe = check_recipe(scheme, recipe, calibration)
    if recipe.needs_calibration:
        calibration.check(model)
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return select(base, recipe, calibration, weights, model if fold else None)

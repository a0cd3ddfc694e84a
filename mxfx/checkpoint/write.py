"""Writing a quantized checkpoint: a bf16 Hugging Face folder's linears quantized by an mxfx scheme, in
msmodelslim's layout (mxfp8 -> W8A8_MXFP8, mxfp4_w4a8 -> packed W4A8_MXFP) or mxfx's documented one
(mxfp4_dual -> W4A4_MXFP4_DUALSCALE), so quantization is done once (stored.py has the layouts). With a
recovery recipe, the recipe's codes (of the smoothed / rotated weight, GPTQ or scale-searched) and what the
activation needs: the smoothing scale per linear and the rotation's description entry."""

import collections
import json
import os
import shutil
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mxfx import recipes
from mxfx.calibration import Calibration
from mxfx.recipes import Recovered
from mxfx.schemes import Scheme, get_scheme
from mxfx.selection import Selection
from mxfx.targets import get_target

from .read import DESCRIPTION, FLOAT, INDEX, _Tensors, skeleton
from .stored import ROTATION, SMOOTH, WRITTEN, CheckpointError, rotation_entry

WRITTEN_TYPES = {scheme: kind.name for scheme, kind in WRITTEN.items()}  # scheme name -> the type written


def _linear_weights(model) -> dict[str, int]:
    """name -> in_features of every nn.Linear weight of the architecture (built on the meta device)."""
    return {f"{name}.weight": m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


class _RecipeSchemes:
    """Each linear weight's Recovered scheme, built from the folder's tensors one input at a time: the
    smoothing of an input reads the weights of every linear on it (q/k/v), which are held until the last
    of them is written."""

    def __init__(self, tensors: _Tensors, base: Scheme, recipe: "recipes.Recipe", calibration: Calibration | None,
                 written: set[str], folds: "recipes.Folds"):
        self.tensors, self.base, self.recipe, self.calibration = tensors, base, recipe, calibration
        self.written, self.folds = written, folds
        self.groups: dict[str, list] = {}  # first member -> [selector, weights, members not yet written]

    def bias(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor that is not quantized, as written: the bias of a linear whose rows take a fold (v_proj's
        rotated, up_proj's scaled) as its scheme adds it."""
        if not name.endswith(".bias"):
            return tensor
        fields = self.folds.fields(name.removesuffix(".bias"), self.recipe.rotation)
        return Recovered(base=self.base, recipe=self.recipe, **fields).output_bias(tensor)

    def __call__(self, name: str, tensor: torch.Tensor) -> tuple[Scheme, torch.Tensor]:
        """(scheme, the weight it is keyed on) for the linear weight `name` read as `tensor`."""
        fqn = name.removesuffix(".weight")
        members = self.calibration.stats(fqn).members if self.recipe.needs_calibration else (fqn,)
        if members[0] not in self.groups:
            weights = {m: tensor if m == fqn else self.tensors.read(f"{m}.weight") for m in members
                       if m == fqn or f"{m}.weight" in self.tensors}
            selector = recipes.select(self.base, self.recipe, self.calibration, weights, folds=self.folds)
            self.groups[members[0]] = [selector, weights, {m for m in members if f"{m}.weight" in self.written}]
        selector, weights, left = self.groups[members[0]]
        left.discard(fqn)
        if not left:
            del self.groups[members[0]]
        return selector.scheme_for(weights[fqn]), weights[fqn]


def _folds(tensors: _Tensors, base: Scheme, recipe: "recipes.Recipe", calibration: Calibration | None,
           architecture: torch.nn.Module, eligible: Mapping[str, Scheme]) -> "recipes.Folds":
    """The offline folds, from the architecture (head_dim, shapes), once the smoothing they depend on is
    decided: of the linears recipes.fold_dependencies names, read one input at a time."""
    smooth: dict = {}
    if recipe.smooth_alpha is not None:
        for fqn in recipes.fold_dependencies(architecture):
            if f"{fqn}.weight" in eligible:
                members = {m: tensors.read(f"{m}.weight") for m in calibration.stats(fqn).members}
                smooth = recipes.smooth_scales(base, recipe, calibration, members, smooth)
    weights = {name.removesuffix(".weight"): architecture.get_parameter(name) for name in eligible}
    return recipes.decide_folds(base, recipe, weights, architecture, smooth)


def _partial_folder(out: Path) -> Path:
    """A new hidden `.NAME.partial-PID` beside `out` (mode from the umask, like any other writer), after
    removing those that killed runs left (their process is gone); a running quantize's is left alone."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):  # ours: a reused pid's
            shutil.rmtree(stale, ignore_errors=True)
            print(f"mxfx quantize: removed {stale}, left by an interrupted run", file=sys.stderr)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
    except OSError as error:
        raise CheckpointError(f"cannot write {out}: {error.strerror} (in {out.parent})") from error
    return partial


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _readme(model_dir: Path, out: Path, scheme, kinds: collections.Counter, recipe: str | None,
            description: dict) -> str:
    """The quantized folder's own README (the original's describes weights that are not in it)."""
    name = scheme if isinstance(scheme, str) else "a mixed-precision plan"
    how = (f"`mxfx quantize --model {model_dir} --scheme {scheme}" + (f" --recipe {recipe}`" if recipe else "`")
           if isinstance(scheme, str) else f"mxfx quantize from {model_dir} with a mixed-precision plan")
    types = ", ".join(f"{count} as {kind}" for kind, count in kinds.most_common())
    transforms = [what for what, on in (
        (f"each linear's smoothing scale is `<linear>.{SMOOTH}` (the activation is multiplied by it)",
         any(name.endswith(f".{SMOOTH}") for name in description)),
        (f"the activations' block rotation is `optional.{ROTATION}` in {DESCRIPTION}",
         ROTATION in description.get("optional", {}))) if on]
    recovered = "" if not transforms else f"""
The codes are those of the transformed weight: {"; ".join(transforms)}. mxfx applies them to the activation
at run time; another reader must as well.
"""
    return f"""# {out.name}: {model_dir.name} quantized to {name}

Written by {how}: linear weights quantized {types}
({DESCRIPTION} names each tensor's type; the rest are FLOAT, as in the original).
The original folder's README.md describes the model itself.
{recovered}
```python
import torch, mxfx
from mxfx import checkpoint
model = checkpoint.load("{out}")
compiled = torch.compile(model, backend=mxfx.backend())   # runs the stored codes
```

or `mxfx eval --model {out}` (or `inspect`).
"""


def _per_linear(plan: Mapping[str, "Scheme | None"], linears: dict[str, int]) -> dict[str, Scheme]:
    """A plan's linears (FQN -> scheme; None: FLOAT) as weight name -> scheme, each checked writable."""
    chosen = {}
    for fqn, scheme in plan.items():
        if f"{fqn}.weight" not in linears:
            raise CheckpointError(f"the plan names {fqn}, which is not an nn.Linear of the model")
        if scheme is None:
            continue
        if scheme.name not in WRITTEN or scheme.stored or scheme.activation_constants:
            why = (f"its activation constants ({', '.join(scheme.activation_constants)}) have no place in "
                   f"{DESCRIPTION}" if scheme.activation_constants else "no stored type runs it")
            raise CheckpointError(f"linear {fqn}: {scheme.label} cannot be written ({why})")
        if (skip := scheme.skip(linears[f"{fqn}.weight"])) is not None:
            raise CheckpointError(f"linear {fqn}: {skip}")
        chosen[f"{fqn}.weight"] = scheme
    return chosen


def quantize(model_dir: str | Path, scheme: "str | Mapping[str, Scheme | None]", out: str | Path, exclude=None,
             shard_bytes: int = 256 << 20, recipe: "str | recipes.Recipe | None" = None,
             calibration: Calibration | None = None) -> Path:
    """Quantize a bf16 Hugging Face folder's linears into a checkpoint folder `out`, tensor by tensor.

    scheme: a scheme name for every linear, or a plan (module FQN -> scheme value or None for FLOAT, e.g.
    `mxfx.mixed_precision.Plan.schemes()`), which writes one stored type per linear (weights-only recipes
    such as GPTQ are written as their base scheme's type; rotation or smoothing cannot be stored).
    Linears the scheme cannot serve (K rule), lm_head, embeddings and those matching `exclude` (fnmatch
    patterns on module FQNs) stay FLOAT; a folder where that leaves nothing to quantize is refused. Tensors
    are read one at a time and written in shards of about `shard_bytes`, so memory stays near one shard plus
    one tensor (and, with a smoothing recipe, the weights of the linears on one input). The folder is written
    under a temporary name and renamed when complete: an interrupted run leaves no folder that looks like a
    checkpoint (and the next run removes what a killed one left).

    recipe (mxfx.recipes: a name, "recommended" or a Recipe) with the calibration it reads (of this model):
    the codes are the recipe's, as `mxfx.backend(scheme, recipe=..., calibration=...)` prepares them, plus
    each linear's smoothing scale and the rotation's description, so the loaded checkpoint compiles to the
    same logits as the online recipe.
    """
    from transformers import AutoConfig

    model_dir, out = Path(model_dir), Path(out)
    if isinstance(scheme, str) and scheme not in WRITTEN_TYPES:
        raise CheckpointError(f"scheme {scheme!r} cannot be written; choose one of {', '.join(WRITTEN_TYPES)}")
    if recipe is None and calibration is not None:
        raise ValueError("a calibration serves a recipe: give recipe= too (mxfx.recipes.RECIPES, or 'recommended')")
    if recipe is not None and not isinstance(scheme, str):
        raise ValueError("recipe= applies to one scheme name, not to a plan (a plan's schemes carry their recipes)")
    if recipe is not None:
        _, recipe = recipes.check_recipe(scheme, recipe, calibration)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    if (model_dir / DESCRIPTION).is_file():
        raise CheckpointError(f"{model_dir} is already a quantized checkpoint (it has {DESCRIPTION}); quantize the "
                              "bf16 folder it came from")
    if out.exists():
        raise CheckpointError(f"{out} already exists")
    select = Selection.of(exclude=exclude)
    architecture = skeleton(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    linears = _linear_weights(architecture)
    plan = None if isinstance(scheme, str) else _per_linear(scheme, linears)
    if recipe is not None and recipe.needs_calibration:
        calibration.check(architecture)  # a calibration of another model is refused before anything is read
    with ExitStack() as stack:
        tensors = _Tensors(model_dir, stack)  # every file's header read: a truncated one fails here
        if plan is None:
            online = get_scheme(scheme)
            plan = {name: online for name in tensors.files
                    if name in linears and online.skip(linears[name]) is None
                    and select.skip(name.removesuffix(".weight")) is None}
        if absent := sorted(set(plan) - set(tensors.files)):
            raise CheckpointError(f"{model_dir}: the plan quantizes {absent[0]}, which no safetensors file stores")
        eligible = plan
        if not eligible:
            what = f"{scheme}'s K rule" if isinstance(scheme, str) else "a scheme in the plan"
            raise CheckpointError(
                f"nothing to quantize in {model_dir}: none of its {len(linears)} nn.Linear weights is stored, meets "
                f"{what} and escapes the exclude patterns ({', '.join(select.excluded)}); no checkpoint written")
        kinds = collections.Counter(WRITTEN[chosen.name].name for chosen in eligible.values())
        # msmodelslim's header names one type: a mixed checkpoint's most common (each tensor has its own)
        description = {"model_quant_type": kinds.most_common(1)[0][0], "version": "1.0.0", "group_size": 32}
        schemes = None
        if recipe is not None:
            folds = _folds(tensors, get_scheme(scheme), recipe, calibration, architecture, eligible)
            schemes = _RecipeSchemes(tensors, get_scheme(scheme), recipe, calibration, set(eligible), folds)
        partial = _partial_folder(out)
        try:
            _write(tensors, eligible, schemes, description, partial, shard_bytes)
            for extra in model_dir.iterdir():  # config, tokenizer, generation config; a README of its own
                if (extra.is_file() and extra.suffix != ".safetensors"
                        and extra.name not in (INDEX, DESCRIPTION, "README.md")):
                    shutil.copyfile(extra, partial / extra.name)
            name = None if recipe is None else recipes.recipe_name(recipe)
            (partial / "README.md").write_text(_readme(model_dir, out, scheme, kinds, name, description))
            (partial / DESCRIPTION).write_text(json.dumps(description, indent=1))
            os.replace(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return out


def _write(tensors: _Tensors, eligible: dict[str, Scheme], schemes: "_RecipeSchemes | None", description: dict,
           partial: Path, shard_bytes: int) -> None:
    """Every tensor of the folder, quantized if eligible by its scheme's own quantizer (so a written
    checkpoint runs exactly what the scheme would; with a recipe, schemes(name, tensor) -> (scheme, the
    tensor it is keyed on)), into shards in `partial` (and their index); a recipe's smoothing scales beside
    the codes (not down_proj's where it folds into up_proj's rows, and bias), its rotation in the description
    (not o_proj's where it folds into v_proj's rows, and bias)."""
    shards, shard, size, weight_map, reference = [], {}, 0, {}, get_target("reference")
    rotated: dict[str, int] = {}  # prefix -> K
    rotation = None
    umask = os.umask(0)
    os.umask(umask)

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, partial / name, metadata={"format": "pt"})
            os.chmod(partial / name, 0o666 & ~umask)  # safetensors writes 0600; follow the umask like the rest
            shards.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, (f, _, stored) in tqdm(tensors.files.items(), desc="mxfx quantize", unit="tensor", disable=None):
        tensor = f.get_tensor(stored)
        prefix = name.removesuffix(".weight")
        written, floats, kind = {}, {name: tensor if schemes is None else schemes.bias(name, tensor)}, None
        if name in eligible:
            scheme, tensor = (eligible[name], tensor) if schemes is None else schemes(name, tensor)
            kind = WRITTEN[scheme.name]
            codes = kind.from_codes(scheme.quantize_weight(reference, tensor), tensor.shape[-1])
            written, floats = {f"{prefix}.{suffix}": value for suffix, value in codes.items()}, {}
            if isinstance(scheme, Recovered) and scheme.online_smooth is not None:  # not a folded one's
                floats[f"{prefix}.{SMOOTH}"] = scheme.online_smooth.tensor.float()  # msmodelslim's fp32 [K], FLOAT
            if isinstance(scheme, Recovered) and scheme.online_rotation is not None:
                rotation, rotated[prefix] = scheme.online_rotation, scheme.k
        for key, value in (*written.items(), *floats.items()):
            description[key] = kind.name if key in written else FLOAT
            shard[key] = value.contiguous()
            size += value.numel() * value.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    if rotation is not None:
        description.setdefault("optional", {})[ROTATION] = rotation_entry(rotation, rotated)
    if len(shards) > 1:
        (partial / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    else:
        os.replace(partial / shards[0], partial / "model.safetensors")

"""Writing a quantized checkpoint: a bf16 Hugging Face folder's linears quantized by an mxfx scheme, in
msmodelslim's layout (mxfp8 -> W8A8_MXFP8, mxfp4_w4a8 -> packed W4A8_MXFP) or mxfx's documented one
(mxfp4_dual -> W4A4_MXFP4_DUALSCALE), so quantization is done once (stored.py has the layouts)."""

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

from mxfx.schemes import Scheme, get_scheme
from mxfx.selection import Selection
from mxfx.targets import get_target

from .read import DESCRIPTION, FLOAT, INDEX, _Tensors, skeleton
from .stored import WRITTEN, CheckpointError

WRITTEN_TYPES = {scheme: kind.name for scheme, kind in WRITTEN.items()}  # scheme name -> the type written


def _linear_weights(config) -> dict[str, int]:
    """name -> in_features of every nn.Linear weight of the architecture (built on the meta device)."""
    return {f"{name}.weight": m.in_features for name, m in skeleton(config).named_modules()
            if isinstance(m, torch.nn.Linear)}


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


def _readme(model_dir: Path, out: Path, scheme, kinds: collections.Counter) -> str:
    """The quantized folder's own README (the original's describes weights that are not in it)."""
    name = scheme if isinstance(scheme, str) else "a mixed-precision plan"
    how = (f"`mxfx quantize --model {model_dir} --scheme {scheme}`" if isinstance(scheme, str)
           else f"mxfx quantize from {model_dir} with a mixed-precision plan")
    types = ", ".join(f"{count} as {kind}" for kind, count in kinds.most_common())
    return f"""# {out.name}: {model_dir.name} quantized to {name}

Written by {how}: linear weights quantized {types}
({DESCRIPTION} names each tensor's type; the rest are FLOAT, as in the original).
The original folder's README.md describes the model itself.

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
             shard_bytes: int = 256 << 20) -> Path:
    """Quantize a bf16 Hugging Face folder's linears into a checkpoint folder `out`, tensor by tensor.

    scheme: a scheme name for every linear, or a plan (module FQN -> scheme value or None for FLOAT, e.g.
    `mxfx.mixed_precision.Plan.schemes()`), which writes one stored type per linear (weights-only recipes
    such as GPTQ are written as their base scheme's type; rotation or smoothing cannot be stored).
    Linears the scheme cannot serve (K rule), lm_head, embeddings and those matching `exclude` (fnmatch
    patterns on module FQNs) stay FLOAT; a folder where that leaves nothing to quantize is refused. Tensors
    are read one at a time and written in shards of about `shard_bytes`, so memory stays near one shard plus
    one tensor. The folder is written under a temporary name and renamed when complete: an interrupted run
    leaves no folder that looks like a checkpoint (and the next run removes what a killed one left).
    """
    from transformers import AutoConfig

    model_dir, out = Path(model_dir), Path(out)
    if isinstance(scheme, str) and scheme not in WRITTEN_TYPES:
        raise CheckpointError(f"scheme {scheme!r} cannot be written; choose one of {', '.join(WRITTEN_TYPES)}")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    if (model_dir / DESCRIPTION).is_file():
        raise CheckpointError(f"{model_dir} is already a quantized checkpoint (it has {DESCRIPTION}); quantize the "
                              "bf16 folder it came from")
    if out.exists():
        raise CheckpointError(f"{out} already exists")
    select = Selection.of(exclude=exclude)
    linears = _linear_weights(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    plan = None if isinstance(scheme, str) else _per_linear(scheme, linears)
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
        partial = _partial_folder(out)
        try:
            _write(tensors, eligible, description, partial, shard_bytes)
            for extra in model_dir.iterdir():  # config, tokenizer, generation config; a README of its own
                if (extra.is_file() and extra.suffix != ".safetensors"
                        and extra.name not in (INDEX, DESCRIPTION, "README.md")):
                    shutil.copyfile(extra, partial / extra.name)
            (partial / "README.md").write_text(_readme(model_dir, out, scheme, kinds))
            (partial / DESCRIPTION).write_text(json.dumps(description, indent=1))
            os.replace(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return out


def _write(tensors: _Tensors, eligible: dict[str, Scheme], description: dict, partial: Path, shard_bytes: int) -> None:
    """Every tensor of the folder, quantized if eligible by its scheme's own quantizer (so a written
    checkpoint runs exactly what the scheme would), into shards in `partial` (and their index)."""
    shards, shard, size, weight_map, reference = [], {}, 0, {}, get_target("reference")
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

    for name, (f, _) in tqdm(tensors.files.items(), desc="mxfx quantize", unit="tensor", disable=None):
        tensor = f.get_tensor(name)
        prefix = name.removesuffix(".weight")
        quantized = name in eligible
        if quantized:
            online = eligible[name]
            kind = WRITTEN[online.name]
            codes = kind.from_codes(online.quantize_weight(reference, tensor), tensor.shape[-1])
            written = {f"{prefix}.{suffix}": value for suffix, value in codes.items()}
        else:
            written = {name: tensor}
        for key, value in written.items():
            description[key] = kind.name if quantized else FLOAT
            shard[key] = value.contiguous()
            size += value.numel() * value.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    if len(shards) > 1:
        (partial / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    else:
        os.replace(partial / shards[0], partial / "model.safetensors")

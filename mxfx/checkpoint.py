"""Quantized checkpoints: read msmodelslim's MX layouts, write mxfx's own in the same layout.

A checkpoint is a Hugging Face folder (config.json, *.safetensors, optionally sharded with
model.safetensors.index.json) plus quant_model_description.json, which maps every tensor name to a type
(shared/notes/npu_ops.md §7). Per quantized linear `<p>`:

| type | `<p>.weight` | `<p>.weight_scale` | other | runs as |
|---|---|---|---|---|
| W8A8_MXFP8 | float8_e4m3fn [N, K] | uint8 E8M0 [N, ceil(K/32)] | | mxfp8 |
| W4A8_MXFP (packed) | uint8 [N, K/2], element 2i low nibble | uint8 [N, ceil(K/32)] | | mxfp4_w4a8 |
| W4A8_MXFP (early export) | float8_e4m3fn [N, K] holding FP4 values | uint8 [N, ceil(K/32)] | | mxfp8 |
| W4A4_MXFP4_DUALSCALE (mxfx's mxfp4_dual) | uint8 [N, K/2] | uint8 [N, ceil(K/32)] | `weight_dual_scale` float32 [N, ceil(K/512), 1] | mxfp4_dual |
| FLOAT | as in the model (bf16) | | | unchanged |

`<p>.bias` (if any) is FLOAT. Loading builds the model with each quantized linear's weight dequantized
to bf16 (so the model also runs eagerly) and the stored tensors attached to that weight; compiling with
`mxfx.backend(scheme="modelslim")` then runs the stored tensors, never re-quantizing.
"""

import json
import math
import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mxfx.formats import dequantize_dual_level, dequantize_mx, from_paired_scales, to_paired_scales

DESCRIPTION = "quant_model_description.json"
INDEX = "model.safetensors.index.json"
FLOAT = "FLOAT"
# type -> (tensor suffix -> dtype); shapes are checked apart
LAYOUTS = {
    "W8A8_MXFP8": {"weight": torch.float8_e4m3fn, "weight_scale": torch.uint8},
    "W4A8_MXFP": {"weight": (torch.uint8, torch.float8_e4m3fn), "weight_scale": torch.uint8},
    "W4A4_MXFP4_DUALSCALE": {"weight": torch.uint8, "weight_scale": torch.uint8, "weight_dual_scale": torch.float32},
}
WRITTEN_TYPES = {"mxfp8": "W8A8_MXFP8", "mxfp4_w4a8": "W4A8_MXFP", "mxfp4_dual": "W4A4_MXFP4_DUALSCALE"}
HEADER_KEYS = ("version", "model_quant_type", "group_size", "metadata", "optional")
# msmodelslim types mxfx knows of but cannot run yet
NOT_YET = {"W4A8_DYNAMIC": "int4 weights through npu_weight_quant_batchmatmul",
           "W4A4_MXFP4": "MXFP4 activations", "W4A4_MXFP4_SVD": "the SVD variant"}


class CheckpointError(ValueError):
    """A checkpoint mxfx cannot read or write; the message names the file and the tensor."""


@dataclass
class QuantizedWeight:
    """A linear's stored tensors, attached to its (dequantized) weight as `weight.mxfx_quantized`."""

    type: str
    tensors: dict[str, torch.Tensor]

    @property
    def scheme(self) -> str:
        """The online scheme whose ops run these tensors."""
        if self.type == "W4A4_MXFP4_DUALSCALE":
            return "mxfp4_dual"
        packed_fp4 = self.type == "W4A8_MXFP" and self.tensors["weight"].dtype == torch.uint8
        return "mxfp4_w4a8" if packed_fp4 else "mxfp8"

    def dequantize(self) -> torch.Tensor:
        t = self.tensors
        if self.scheme == "mxfp4_dual":
            return dequantize_dual_level(t["weight"], t["weight_dual_scale"].flatten(-2), t["weight_scale"])
        # FP4 values in an E4M3 container (early W4A8_MXFP exports) are exact as E4M3
        return dequantize_mx(t["weight"], t["weight_scale"], "fp4_e2m1" if self.scheme == "mxfp4_w4a8" else "fp8_e4m3")

    def codes(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors as the torch_npu quantizer of the scheme returns them (Scheme.quantize_weight)."""
        t = {name: tensor.to(device) for name, tensor in self.tensors.items()}
        scale = to_paired_scales(t["weight_scale"])
        if self.scheme == "mxfp4_dual":
            return {"q": t["weight"], "level0": t["weight_dual_scale"].flatten(-2), "level1": scale}
        return {"q": t["weight"], "scale": scale}


# -- reading ---------------------------------------------------------------------------------------------
def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{index}: not a safetensors index ({error})") from error
        return [folder / name for name in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors files")
    return files


class _Tensors:
    """The folder's tensors by name, read one at a time from its open safetensors files (memory-mapped),
    so loading holds one linear's stored tensors at a time, never the whole checkpoint."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.files: dict[str, tuple] = {}  # name -> (open file, path)
        for path in _safetensors_files(folder):
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX} but missing")
            try:
                f = stack.enter_context(safe_open(path, framework="pt"))
            except Exception as error:  # safetensors raises its own error types for a bad header or a short file
                raise CheckpointError(f"{path}: cannot read safetensors (truncated or corrupt?): {error}") from error
            for name in f.keys():
                if name in self.files:
                    raise CheckpointError(f"{path}: tensor {name} is also in {self.files[name][1].name}")
                self.files[name] = (f, path)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def path(self, name: str) -> Path:
        return self.files[name][1]

    def __getitem__(self, name: str) -> torch.Tensor:
        f, path = self.files[name]
        try:
            return f.get_tensor(name)
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read tensor {name}: {error}") from error


def read_description(folder: Path) -> dict[str, str]:
    path = folder / DESCRIPTION
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {DESCRIPTION}: not a quantized (msmodelslim or mxfx) checkpoint")
    try:
        description = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from error
    types = {name: kind for name, kind in description.items() if name not in HEADER_KEYS}
    for name, kind in types.items():
        if kind in NOT_YET:
            raise CheckpointError(f"{path}: tensor {name} is {kind} ({NOT_YET[kind]}), which mxfx does not support yet")
        if kind != FLOAT and kind not in LAYOUTS:
            raise CheckpointError(f"{path}: tensor {name} has unknown type {kind!r}; known: {', '.join([FLOAT, *LAYOUTS])}")
    return types


def _plan(description: dict[str, str], tensors: _Tensors) -> tuple[list[str], dict[str, str]]:
    """The FLOAT tensor names and the quantized linears (prefix -> type), checked against the files'
    tensor names before anything is read: a missing or extra tensor fails fast."""
    floats, quantized, used = [], {}, set()
    for name, kind in description.items():
        if kind == FLOAT:
            if name not in tensors:
                raise CheckpointError(f"missing tensor {name} (in {DESCRIPTION} as FLOAT)")
            floats.append(name)
            used.add(name)
        elif name.endswith(".weight") and (prefix := name.removesuffix(".weight")) not in quantized:
            quantized[prefix] = kind
            for suffix in LAYOUTS[kind]:
                if f"{prefix}.{suffix}" not in tensors:
                    raise CheckpointError(f"missing tensor {prefix}.{suffix}: {kind} needs {', '.join(LAYOUTS[kind])}")
                used.add(f"{prefix}.{suffix}")
    extra = sorted(set(tensors.files) - used)
    if extra:
        raise CheckpointError(f"{tensors.path(extra[0]).name}: extra tensor {extra[0]} (not in {DESCRIPTION})")
    return floats, quantized


def _read_quantized(prefix: str, kind: str, tensors: _Tensors) -> QuantizedWeight:
    stored = {}
    for suffix, dtypes in LAYOUTS[kind].items():
        name = f"{prefix}.{suffix}"
        tensor = tensors[name]
        allowed = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if tensor.dtype not in allowed:
            raise CheckpointError(f"{tensors.path(name).name}: {name} is {tensor.dtype}; {kind} stores it as {' or '.join(map(str, allowed))}")
        stored[suffix] = tensor
    weight = stored["weight"]
    n, k = weight.shape[0], weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    expected = {"weight_scale": (n, math.ceil(k / 32)), "weight_dual_scale": (n, math.ceil(k / 512), 1)}
    for suffix, shape in expected.items():
        if suffix in stored and tuple(stored[suffix].shape) != shape:
            raise CheckpointError(f"{tensors.path(f'{prefix}.{suffix}').name}: {prefix}.{suffix} has shape "
                                  f"{list(stored[suffix].shape)}, expected {list(shape)} for a [{n}, {k}] weight")
    return QuantizedWeight(kind, stored)


def _empty_model(config) -> torch.nn.Module:
    """The architecture in bf16 with its parameters allocated but not initialised (every one is then
    replaced from the checkpoint); buffers such as RoPE frequencies are computed as usual."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor, source: str) -> None:
    module_name, _, attr = name.rpartition(".")
    try:
        old = model.get_submodule(module_name)._parameters[attr]
    except (AttributeError, KeyError):
        old = None
    if old is None:
        raise CheckpointError(f"{source}: {name} is not a parameter of a {model.config.model_type} model")
    if value.shape != old.shape or not value.is_floating_point():
        raise CheckpointError(f"{source}: {name} is {value.dtype} {list(value.shape)}; the model's parameter is "
                              f"{old.dtype} {list(old.shape)}")
    model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(value.to(old.dtype), requires_grad=False)


def load(folder: str | Path) -> torch.nn.Module:
    """A quantized checkpoint folder as a bf16 model whose quantized linears carry their stored tensors.

    Names, types and the tensors' presence are checked first; then the tensors are read one linear at
    a time, so the peak is the model's bf16 weights plus its stored codes plus one linear.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json")
    description = read_description(folder)
    with ExitStack() as stack:
        tensors = _Tensors(folder, stack)
        floats, quantized = _plan(description, tensors)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        model = _empty_model(config)
        for name in tqdm(floats, desc="mxfx load (FLOAT)", unit="tensor", disable=None):
            _set_parameter(model, name, tensors[name], tensors.path(name).name)
        for prefix, kind in tqdm(quantized.items(), desc="mxfx load (quantized)", unit="linear", disable=None):
            stored = _read_quantized(prefix, kind, tensors)
            name = f"{prefix}.weight"
            _set_parameter(model, name, stored.dequantize().to(torch.bfloat16), tensors.path(name).name)
            model.get_parameter(name).mxfx_quantized = stored
    loaded = set(floats) | {f"{prefix}.weight" for prefix in quantized}
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(dict(model.named_parameters(remove_duplicate=False))) - loaded - tied)
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if tied:
        model.tie_weights()
    model.mxfx_checkpoint_scheme = "modelslim"  # what `mxfx eval` / `inspect` compile it with
    return model


def scheme_of(folder: str | Path) -> str:
    """The scheme name to compile a checkpoint folder with: "modelslim" for any quantized checkpoint."""
    read_description(Path(folder))
    return "modelslim"


# -- writing ---------------------------------------------------------------------------------------------
def _stored(scheme, target, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight quantized by the scheme's own quantizer, in the checkpoint layout: the inverse of
    QuantizedWeight.codes, so a written checkpoint runs exactly what the scheme would."""
    codes = scheme.quantize_weight(target, weight)
    blocks = math.ceil(weight.shape[-1] / 32)
    if "level0" in codes:
        return {"weight": codes["q"], "weight_scale": from_paired_scales(codes["level1"], blocks).view(torch.uint8),
                "weight_dual_scale": codes["level0"].unsqueeze(-1)}
    return {"weight": codes["q"], "weight_scale": from_paired_scales(codes["scale"], blocks).view(torch.uint8)}


def _linear_weights(config) -> dict[str, int]:
    """name -> in_features of every nn.Linear weight of the architecture (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {f"{name}.weight": m.in_features for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}


def quantize(model_dir: str | Path, scheme: str, out: str | Path, exclude=None, shard_bytes: int = 256 << 20) -> Path:
    """Quantize a bf16 Hugging Face folder's linears into a checkpoint folder `out`, tensor by tensor.

    Linears the scheme cannot serve (K rule) or that match `exclude` (default: lm_head, embeddings) stay
    FLOAT. Tensors are read one at a time and written in shards of about `shard_bytes`, so memory stays
    near one shard plus one tensor. The folder is written under a temporary name and renamed when
    complete: an interrupted run leaves no folder that looks like a checkpoint.
    """
    import fnmatch

    from transformers import AutoConfig

    import passes
    from mxfx.schemes import get_scheme

    model_dir, out = Path(model_dir), Path(out)
    if scheme not in WRITTEN_TYPES:
        raise CheckpointError(f"scheme {scheme!r} cannot be written; choose one of {', '.join(WRITTEN_TYPES)}")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    if out.exists():
        raise CheckpointError(f"{out} already exists")
    exclude = passes.DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
    linears = _linear_weights(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    rule, reference = get_scheme(scheme), passes.get_target("reference")
    description = {"model_quant_type": WRITTEN_TYPES[scheme], "version": "1.0.0", "group_size": 32}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shards, shard, size, weight_map = [], {}, 0, {}

        def flush():
            nonlocal shard, size
            if shard:
                name = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(shard, partial / name, metadata={"format": "pt"})
                shards.append(name)
                weight_map.update(dict.fromkeys(shard, name))
                shard, size = {}, 0

        for path in _safetensors_files(model_dir):
            with safe_open(path, framework="pt") as f:
                for name in tqdm(list(f.keys()), desc=f"mxfx quantize {path.name}", unit="tensor", disable=None):
                    tensor = f.get_tensor(name)
                    prefix = name.removesuffix(".weight")
                    eligible = (name in linears and rule.skip_reason(linears[name]) is None
                                and not any(fnmatch.fnmatchcase(prefix, p) for p in exclude))
                    written = {f"{prefix}.{k}": v for k, v in _stored(rule, reference, tensor).items()} if eligible else {name: tensor}
                    for key, value in written.items():
                        description[key] = WRITTEN_TYPES[scheme] if eligible else FLOAT
                        shard[key] = value.contiguous()
                        size += value.numel() * value.element_size()
                    if size >= shard_bytes:
                        flush()
        flush()
        if len(shards) > 1:
            (partial / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        else:
            os.replace(partial / shards[0], partial / "model.safetensors")
        for extra in model_dir.iterdir():  # config, tokenizer, generation config
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (INDEX, DESCRIPTION):
                shutil.copy2(extra, partial / extra.name)
        (partial / DESCRIPTION).write_text(json.dumps(description, indent=1))
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out

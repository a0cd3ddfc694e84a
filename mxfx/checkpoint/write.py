"""Writing a quantized checkpoint: a bf16 Hugging Face folder's linears quantized by an mxfx scheme, in
msmodelslim's layout (mxfp8 -> W8A8_MXFP8, mxfp4_w4a8 -> packed W4A8_MXFP) or mxfx's documented one
(mxfp4_dual -> W4A4_MXFP4_DUALSCALE), so quantization is done once (stored.py has the layouts)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mxfx.schemes import get_scheme
from mxfx.selection import Selection
from mxfx.targets import get_target

from .read import DESCRIPTION, FLOAT, INDEX, safetensors_files
from .stored import WRITTEN, CheckpointError

WRITTEN_TYPES = {scheme: kind.name for scheme, kind in WRITTEN.items()}  # scheme name -> the type written


def _linear_weights(config) -> dict[str, int]:
    """name -> in_features of every nn.Linear weight of the architecture (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {f"{name}.weight": m.in_features for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}


def quantize(model_dir: str | Path, scheme: str, out: str | Path, exclude=None, shard_bytes: int = 256 << 20) -> Path:
    """Quantize a bf16 Hugging Face folder's linears into a checkpoint folder `out`, tensor by tensor.

    Linears the scheme cannot serve (K rule), lm_head, embeddings and those matching `exclude` (fnmatch
    patterns on module FQNs) stay FLOAT. Tensors are read one at a time and written in shards of about `shard_bytes`, so memory stays
    near one shard plus one tensor. The folder is written under a temporary name and renamed when
    complete: an interrupted run leaves no folder that looks like a checkpoint.
    """
    from transformers import AutoConfig

    model_dir, out = Path(model_dir), Path(out)
    if scheme not in WRITTEN_TYPES:
        raise CheckpointError(f"scheme {scheme!r} cannot be written; choose one of {', '.join(WRITTEN_TYPES)}")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    if out.exists():
        raise CheckpointError(f"{out} already exists")
    select = Selection.of(exclude=exclude)
    linears = _linear_weights(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    online, kind, reference = get_scheme(scheme), WRITTEN[scheme], get_target("reference")
    description = {"model_quant_type": kind.name, "version": "1.0.0", "group_size": 32}
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

        for path in safetensors_files(model_dir):
            with safe_open(path, framework="pt") as f:
                for name in tqdm(list(f.keys()), desc=f"mxfx quantize {path.name}", unit="tensor", disable=None):
                    tensor = f.get_tensor(name)
                    prefix = name.removesuffix(".weight")
                    eligible = name in linears and online.skip(linears[name]) is None and select.skip(prefix) is None
                    if eligible:  # the scheme's own quantizer: a written checkpoint runs exactly what the scheme would
                        codes = kind.from_codes(online.quantize_weight(reference, tensor), tensor.shape[-1])
                        written = {f"{prefix}.{suffix}": value for suffix, value in codes.items()}
                    else:
                        written = {name: tensor}
                    for key, value in written.items():
                        description[key] = kind.name if eligible else FLOAT
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

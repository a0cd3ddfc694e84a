"""Checkpoints in msmodelslim's layouts, written from the documented format (msmodelslim's savers,
vllm-ascend's and sglang's loaders; shared/notes/npu_ops.md §7) with mxfx.formats and plain torch,
independently of mxfx.checkpoint's writer."""

import json

import torch
from safetensors.torch import load_file, save_file

import mxfx
from mxfx import checkpoint
from mxfx.formats import quantize_mx


def _copy_config(model_dir, folder):
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        (folder / name).write_text((model_dir / name).read_text())


def edit_tensors(folder, change):
    """Rewrite the folder's model.safetensors with change(tensors) applied."""
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def describe(folder, name, kind):
    """Set one entry of the folder's quant_model_description.json (kind None: remove it)."""
    path = folder / checkpoint.DESCRIPTION
    description = json.loads(path.read_text()) | {name: kind}
    path.write_text(json.dumps({key: value for key, value in description.items() if value is not None}))


def mx_folder(model_dir, folder, types):
    """A checkpoint in msmodelslim's layout, written from the documented format with mxfx.formats."""
    _copy_config(model_dir, folder)
    tensors, description = {}, {"model_quant_type": "W8A8_MXFP8", "version": "1.0.0", "group_size": 32}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        kind = types(name) if name.endswith("proj.weight") else "FLOAT"
        prefix = name.removesuffix(".weight")
        if kind == "FLOAT":
            tensors[name], description[name] = tensor, "FLOAT"
            continue
        fmt = "fp8_e4m3" if kind == "W8A8_MXFP8" else "fp4_e2m1"
        q, scale = quantize_mx(tensor, fmt)
        if kind == "W4A8_MXFP_FP8":  # the early export: FP4 values in an E4M3 container
            q, kind = (mxfx.formats.e2m1_decode(mxfx.formats.unpack_fp4(q)) * 1.0).to(torch.float8_e4m3fn), "W4A8_MXFP"
        tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"] = q, scale.view(torch.uint8)
        description[f"{prefix}.weight"] = description[f"{prefix}.weight_scale"] = kind
    save_file(tensors, folder / "model.safetensors")
    (folder / checkpoint.DESCRIPTION).write_text(json.dumps(description))
    return folder


def int4_quantize(w: torch.Tensor, group: int):
    """Symmetric int4 (msmodelslim: scale = amax / 7) in fp32, two-level when per group: a per-channel
    scale [N, 1] times a per-group one [N, K/group]. Returns (values int8 [N, K], channel, second)."""
    w = w.float()
    channel = w.abs().amax(-1, keepdim=True) / 7
    if not group:
        return torch.clamp(torch.round(w / channel), -8, 7).to(torch.int8), channel, None
    blocks = w.reshape(w.shape[0], -1, group)
    second = blocks.abs().amax(-1) / 7 / channel
    q = torch.clamp(torch.round(blocks / (channel * second).unsqueeze(-1)), -8, 7).to(torch.int8)
    return q.reshape(w.shape), channel, second


def int4_golden(q, channel, second, group, dtype=torch.bfloat16) -> torch.Tensor:
    """The ops-nn golden's dequantized weight [N, K] from stored tensors: the antiquant scale is
    channel * second in fp32 (vllm-ascend), cast to the activation's dtype; Wdq = dtype(q * scale)."""
    scale = channel.float() * second.float() if group else channel.float()
    per_element = scale.to(dtype).float().repeat_interleave(group or q.shape[1], -1)
    return (q.float() * per_element).to(dtype)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """msmodelslim w4a8_pack_int4: [N, K] -> [K, N] -> pairs along N (even row low nibble) -> [N/2, K]."""
    pairs = q.t().contiguous().reshape(-1, 2)
    packed = torch.bitwise_or(torch.bitwise_left_shift(pairs[:, 1:], 4), pairs[:, :1] & 0b00001111)
    return packed.reshape(q.shape[1], -1).t().contiguous()


def _scale_bias(name, q, channel):
    """msmodelslim process_scale: 8 * sum over K ([N, 1]), or over 16 chunks of K for down/o ([N, 16])."""
    deq = q.float() * channel
    chunks = 16 if ("down_proj" in name or "o_proj" in name) else 1
    return 8 * deq.reshape(deq.shape[0], chunks, -1).sum(-1)


def int4_folder(model_dir, folder, variant, group, dtype=torch.bfloat16):
    """variant: "v0" (one int4 per byte, bf16 scales), "v1" (packed, fp32 scales, scale_bias). Returns the
    folder and, per linear, the golden dequantized weight for activations of `dtype`."""
    _copy_config(model_dir, folder)
    description = {"model_quant_type": "W4A8_DYNAMIC", "group_size": group}
    if variant == "v1":
        description["version"] = "1.0.0"
    tensors, golden = {}, {}
    scale_dtype = torch.bfloat16 if variant == "v0" else torch.float32
    for name, w in load_file(model_dir / "model.safetensors").items():
        if not name.endswith("proj.weight"):
            tensors[name], description[name] = w, "FLOAT"
            continue
        prefix = name.removesuffix(".weight")
        q, channel, second = int4_quantize(w, group)
        stored = {"weight": q if variant == "v0" else int4_pack(q), "weight_scale": channel.to(scale_dtype),
                  "weight_offset": torch.zeros_like(channel, dtype=scale_dtype)}
        if group:
            stored |= {"weight_scale_second": second.to(scale_dtype),
                       "weight_offset_second": torch.zeros(second.shape, dtype=torch.int64)}
        if variant == "v1":
            stored["scale_bias"] = _scale_bias(name, q, channel)
        for suffix, tensor in stored.items():
            tensors[f"{prefix}.{suffix}"], description[f"{prefix}.{suffix}"] = tensor, "W4A8_DYNAMIC"
        golden[prefix] = int4_golden(q, stored["weight_scale"], stored.get("weight_scale_second"), group, dtype)
    save_file(tensors, folder / "model.safetensors")
    (folder / checkpoint.DESCRIPTION).write_text(json.dumps(description))
    return folder, golden

"""Test models with outlier activation channels, as trained LLMs have them at the inputs of every kind of
linear, built from a Qwen3 model without changing what it computes in bf16.

`with_outliers(model, channels, factor, seed)` returns a copy in which a few seeded channels of each linear
input are `factor` (a power of two) times larger and the weights reading them `factor` times smaller:

- after the norms: input_layernorm / post_attention_layernorm weight channel * f, q/k/v (gate/up) columns / f;
- inside the MLP: up_proj rows * f (silu(gate) * up carries it), down_proj columns / f;
- after attention: v_proj rows of KV head j, channel c, * f (attention mixes tokens, not channels), and
  o_proj columns of channel c of every query head reading KV head j (GQA), / f.

q/k rows are left alone: q_norm/k_norm would absorb their scale. A power of two commutes with every
bf16/fp32 rounding (barring overflow and subnormals), so the copy's bf16 logits equal the original's bit
for bit, while an MX block holding an outlier channel crushes its other values.
"""

import copy
import math

import torch


def _check(model, channels: int, factor: float) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(model.config, "model_type", None) != "qwen3":
        raise ValueError(f"with_outliers builds Qwen3 models (model.model.layers), not {type(model).__name__}")
    mantissa, _ = math.frexp(float(factor))
    if not (math.isfinite(factor) and factor > 1 and mantissa == 0.5):
        raise ValueError(f"outlier factor must be a power of two > 1 (bf16-exact scaling), got {factor}")
    head_dim = model.config.head_dim
    if not 1 <= channels <= head_dim:
        raise ValueError(f"outlier channels per activation must be in [1, head_dim={head_dim}], got {channels}")
    return list(layers)


def _scale_rows(linear: torch.nn.Linear, rows: torch.Tensor, factor: float) -> None:
    linear.weight[rows] *= factor
    if linear.bias is not None:
        linear.bias[rows] *= factor


@torch.no_grad()
def with_outliers(model: torch.nn.Module, channels: int = 2, factor: float = 256.0, seed: int = 0) -> torch.nn.Module:
    """A copy of the Qwen3 `model` (never modified) with `channels` seeded outlier channels, `factor` times
    larger, at the input of each linear of every decoder layer: the residual stream after each norm, the
    MLP's intermediate, and `channels` (KV head, channel) pairs of the attention output (each one channel per
    query head of its group). Its bf16 outputs are bit-identical to the model's."""
    _check(model, channels, factor)
    copied = copy.deepcopy(model)
    config = copied.config
    head_dim, group = config.head_dim, config.num_attention_heads // config.num_key_value_heads
    g = torch.Generator().manual_seed(seed)

    def pick(width: int) -> torch.Tensor:
        return torch.randperm(width, generator=g)[:channels]

    for layer in _check(copied, channels, factor):
        attention, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            c = pick(norm.weight.shape[0])
            norm.weight[c] *= factor
            for linear in readers:
                linear.weight[:, c] /= factor
        c = pick(mlp.up_proj.weight.shape[0])
        _scale_rows(mlp.up_proj, c, factor)
        mlp.down_proj.weight[:, c] /= factor
        pairs = pick(config.num_key_value_heads * head_dim)  # kv head * head_dim + channel
        kv_head, channel = pairs // head_dim, pairs % head_dim
        _scale_rows(attention.v_proj, pairs, factor)
        query_heads = kv_head.unsqueeze(1) * group + torch.arange(group)  # [channels, group]
        attention.o_proj.weight[:, (query_heads * head_dim + channel.unsqueeze(1)).flatten()] /= factor
    return copied

"""Small transformers models built from configs (random weights, no downloads)."""

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3(layers: int = 2, seed: int = 0, **fields) -> Qwen3ForCausalLM:
    """Qwen3 with dimensions that meet the kernels' rules: hidden 512, intermediate 1536, head_dim 64
    (`fields` override config fields)."""
    config = Qwen3Config(**{
        "vocab_size": 256, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": layers,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 256,
        "tie_word_embeddings": False, **fields,
    })
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).to(torch.bfloat16).eval()


def tiny_qwen3_moe(seed: int = 0):
    """One Qwen3-MoE layer: 8 experts as 3-D parameters (transformers' grouped_mm path) and a router."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=512, intermediate_size=1536, moe_intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()


def tiny_gpt2(seed: int = 0):
    """GPT-2, whose Conv1D layers are linears with [K, N] weights (addmm)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return (GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=512, n_head=8, vocab_size=256, n_positions=64))
            .to(torch.bfloat16).eval())

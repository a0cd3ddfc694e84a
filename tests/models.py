"""Small transformers models built from configs (random weights, no downloads)."""

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3(layers: int = 2, seed: int = 0) -> Qwen3ForCausalLM:
    """Qwen3 with dimensions that meet the kernels' rules: hidden 512, intermediate 1536, head_dim 64."""
    config = Qwen3Config(
        vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).to(torch.bfloat16).eval()

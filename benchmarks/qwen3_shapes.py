"""The model shapes the benchmarks build (from configs: nothing is downloaded)."""

from transformers import Qwen3Config


def qwen3_06b_shaped(layers: int, **overrides) -> Qwen3Config:
    """Qwen3-0.6B's shapes (hidden 1024, intermediate 3072, 16 heads, 8 KV heads, head_dim 128, vocab
    151936, tied embeddings) with `layers` layers; `overrides` change any config field."""
    shapes = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    return Qwen3Config(**(shapes | overrides))

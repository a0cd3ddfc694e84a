"""Train the small Qwen3 that mxfx ships for its demo, on the Python reference-manual topics
(pydoc_data.topics, byte-level tokens; the topics in mxfx.textdata.HELD_OUT held out). Seeded and deterministic on one
machine: `python examples/train_tiny_qwen3.py --out mxfx/data/tiny-qwen3-pydoc`.

Dimensions meet the Ascend kernels' rules (hidden and intermediate multiples of 512): hidden 512,
intermediate 1536, 4 layers, 8 heads, 4 KV heads, head_dim 64; embeddings tied to the output layer.
"""

import argparse
import math
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from mxfx import textdata
from mxfx.cli import HelpFormatter, at_least


def config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=textdata.VOCAB_SIZE, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=textdata.END_OF_TEXT, eos_token_id=textdata.END_OF_TEXT,
        pad_token_id=textdata.END_OF_TEXT, torch_dtype="bfloat16",
    )


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq: int, dtype=torch.float32) -> float:
    windows = stream[: len(stream) // (seq + 1) * (seq + 1)].view(-1, seq + 1)
    total, count = 0.0, 0
    for batch in windows.split(16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(batch[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--steps", type=at_least(1), default=1000, help="optimizer steps (the shipped model: 1000)")
    parser.add_argument("--batch", type=at_least(1), default=16, help="sequences per step")
    parser.add_argument("--seq", type=at_least(1), default=256, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    train_names, held_out = textdata.split()
    train, evaluation = textdata.tokens(train_names), textdata.tokens(held_out)
    print(f"train: {len(train_names)} topics, {len(train):,} tokens; "
          f"held out: {len(held_out)} topics, {len(evaluation):,} tokens")

    model = Qwen3ForCausalLM(config())
    untrained = perplexity(model.eval(), evaluation, args.seq)
    print(f"untrained held-out perplexity {untrained:.2f}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    for step in range(args.steps):
        offsets = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=generator)
        batch = torch.stack([train[o : o + args.seq + 1] for o in offsets.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {schedule.get_last_lr()[0]:.2e}  "
                  f"{time.time() - start:.0f} s", flush=True)

    model.eval()
    trained = perplexity(model, evaluation, args.seq)
    print(f"held-out perplexity: untrained {untrained:.2f}, trained {trained:.2f} (fp32)")
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()

"""Mixed precision measured: perplexity against average bits on the shipped model's held-out topics, for
`scheme="auto"` (mxfx.mixed_precision), the uniform schemes, and the "first N blocks in higher precision"
heuristic at the same bits (first N blocks bf16 or mxfp8, the rest mxfp4_w4a8+gptq).

    python examples/measure_mixed_precision.py [--windows 64] [--sensitivity-windows 8] [--max-tokens N]
    python examples/measure_mixed_precision.py --qwen3-0.6b-layers 2   # the sensitivity pass's time only

Calibration (GPTQ's Gram matrices) on `--windows` windows of 256 training-topic tokens, the sensitivities
on the first `--sensitivity-windows` of them; everything evaluated on the held-out topics.
"""

import argparse
import math
import time

import torch

import mxfx
from mxfx import evaluation, textdata
from mxfx import mixed_precision as mp
from mxfx.calibrating import calibrate
from mxfx.cli import HelpFormatter

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--windows", type=int, default=64, help="calibration windows of 256 tokens (training topics)")
parser.add_argument("--sensitivity-windows", type=int, default=8, help="of those, the ones sensitivity runs on")
parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens to evaluate (default: all)")
parser.add_argument("--budgets", type=float, nargs="+", default=[4.3, 4.5, 5.0, 6.0, 8.3],
                    help="auto's budgets (besides the heuristics' bits)")
parser.add_argument("--candidates", nargs="+", default=["mxfp8", "mxfp4_w4a8", "mxfp4_w4a8+gptq",
                                                        "mxfp4_dual+rotate+gptq"])
parser.add_argument("--cache", default=None, help="sensitivity file (read if it matches, else written)")
parser.add_argument("--qwen3-0.6b-layers", dest="qwen3_layers", type=int, default=None,
                    help="only time the sensitivity pass on a random Qwen3-0.6B-shaped model with this many layers")
args = parser.parse_args()


def time_qwen3_shaped(layers: int) -> None:
    """The sensitivity pass on Qwen3-0.6B's shapes (hidden 1024, intermediate 3072, 16/8 heads of 128,
    vocab 151,936), random weights, `layers` of its 28 layers, one window of 256 tokens, plain candidates."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    batches = [torch.randint(0, config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))]
    start = time.perf_counter()
    with torch.no_grad():
        model(batches[0])
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    sensitivity = mp.measure(model, batches)
    elapsed = time.perf_counter() - start
    runs = sum(len(linear.options) - 1 for linear in sensitivity.linears.values())
    print(f"Qwen3-0.6B-shaped, {layers} layers: {runs} runs in {elapsed:.0f} s ({elapsed / runs:.2f} s a run, "
          f"a bf16 forward {forward_s:.2f} s)" + ("" if layers == 28 else (
              f"; 28 layers have {runs * 28 // layers} runs, each at least as long: over "
              f"{runs * 28 // layers * elapsed / runs / 60:.0f} min (not measured)")))


if args.qwen3_layers:
    time_qwen3_shaped(args.qwen3_layers)
    raise SystemExit

model = evaluation.load_model(evaluation.SHIPPED_MODEL)
training, held_out = textdata.split()
windows = evaluation.windows(textdata.tokens(training), 256)
chosen = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[: args.windows], :-1]
start = time.perf_counter()
calibration = calibrate(model, chosen.split(8))
print(f"{calibration} in {time.perf_counter() - start:.0f} s")
start = time.perf_counter()
sensitivity = mp.measured(args.cache, model, chosen[: args.sensitivity_windows].split(8), calibration, args.candidates)
print(f"{sensitivity}: {time.perf_counter() - start:.0f} s (0 if read from --cache)")

batches = evaluation.windows(textdata.tokens(held_out), 256, args.max_tokens)
bf16_predictions, bf16_loss = evaluation.predictions_and_loss(model, batches, 8, "bf16")
print(f"bf16: perplexity {math.exp(bf16_loss):.4f} on {batches[:, 1:].numel()} held-out tokens")


def uniform(label: str) -> mp.Plan:
    return mp.Plan(sensitivity, dict.fromkeys(sensitivity.linears, label))


layers = model.config.num_hidden_layers
runs = [(label, uniform(label)) for label in sensitivity.candidates]
heuristics = [(f"first {n} {keep}", mp.first_blocks(sensitivity, n, "mxfp4_w4a8+gptq", keep))
              for keep in ("bf16", "mxfp8") for n in range(1, layers)]
budgets = sorted({*args.budgets, *(round(plan.bits, 4) for _, plan in heuristics if plan.bits <= 8.3)})
runs += [(f"auto {bits}", mp.solve(sensitivity, bits)) for bits in budgets]
runs += [(name, plan) for name, plan in heuristics if plan.bits <= 8.3]
rows = []
for name, plan in runs:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mxfx.backend(scheme=plan, target="reference"), dynamic=True,
                             fullgraph=True)
    predictions, loss = evaluation.predictions_and_loss(compiled, batches, 8, name)
    gap = math.exp(loss - bf16_loss) - 1
    agreement = (predictions == bf16_predictions).float().mean().item()
    rows.append((name, plan.bits, math.exp(loss), gap, agreement, plan.kl))
    print(f"{name:22s} {plan.bits:.4f} bits  perplexity {math.exp(loss):.4f} ({100 * gap:+.3f}%), next token = bf16 "
          f"{100 * agreement:.2f}%, summed KL {plan.kl:.3g}", flush=True)

print("\n| run | bits | perplexity | vs bf16 | next token = bf16 |\n|---|---|---|---|---|")
for name, bits, ppl, gap, agreement, _ in sorted(rows, key=lambda r: (r[1], r[0])):
    print(f"| {name} | {bits:.3f} | {ppl:.4f} | {100 * gap:+.3f}% | {100 * agreement:.2f}% |")

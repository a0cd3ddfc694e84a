"""Cost of the graph rewrite on a 4-layer model with Qwen3-0.6B's shapes (qwen3_shapes; vocab 4096,
untied): find_linears + quantize_linears with weight preparation taken out
(reported apart, in GB/s of bf16 weights), as a ratio to the Dynamo trace time of the same model, both
measured in this run. Goal: ratio <= 0.10."""

import argparse
import time

import torch
from qwen3_shapes import qwen3_06b_shaped
from transformers import Qwen3ForCausalLM

import passes
from mxfx.schemes import SCHEMES, get_scheme


def qwen3_06b_shaped_model(layers: int) -> Qwen3ForCausalLM:
    config = qwen3_06b_shaped(layers, vocab_size=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).to(torch.bfloat16).eval()


def trace(model, ids):
    """Dynamo's graph and weights for the model, and the seconds Dynamo took to produce them."""
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend=backend)(ids)
    seconds = time.perf_counter() - start
    gm = captured["gm"]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    weights = {n: t for n, t in zip(names, captured["inputs"]) if isinstance(t, torch.nn.Parameter)}
    return gm, weights, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scheme", default="mxfp4_dual", choices=list(SCHEMES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = qwen3_06b_shaped_model(args.layers)
    ids = torch.randint(0, 4096, (1, 16))
    scheme = get_scheme(args.scheme)

    prepared = {}

    def timed_prepare(scheme, target, weight, bias, dtype):
        start = time.perf_counter()
        tensors = scheme.prepare(target, weight, bias, dtype)
        prepared[(id(weight), id(bias))] = tensors, time.perf_counter() - start
        return tensors

    def cached_prepare(scheme, target, weight, bias, dtype):
        return prepared[(id(weight), id(bias))][0]

    trace_s, rewrite_s = float("inf"), float("inf")
    for attempt in range(args.repeats):
        gm, weights, seconds = trace(model, ids)
        trace_s = min(trace_s, seconds)
        prepare = timed_prepare if attempt == 0 else cached_prepare
        start = time.perf_counter()
        report = passes.quantize_linears(gm, scheme, "reference", weights, prepare=prepare)
        if attempt:  # the first pass also prepared the weights; later ones measure the rewrite alone
            rewrite_s = min(rewrite_s, time.perf_counter() - start)

    prep_s = sum(s for _, s in prepared.values())
    gb = report.bytes_before / 1e9
    print(f"{args.layers}-layer Qwen3-0.6B-shaped model, scheme {scheme.name}: {len(report.rewritten)} linears "
          f"rewritten, {report.activation_quants} activation quantizations")
    print(f"Dynamo trace                      {trace_s * 1e3:9.1f} ms")
    print(f"find_linears + rewrite            {rewrite_s * 1e3:9.1f} ms   "
          f"ratio to trace {rewrite_s / trace_s:.3f}  (goal <= 0.10)")
    print(f"weight preparation (apart)        {prep_s * 1e3:9.1f} ms   {gb / prep_s:.2f} GB/s of bf16 weights")


if __name__ == "__main__":
    main()

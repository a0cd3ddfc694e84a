"""What passes.FUSION_PASSES (merge_siblings, fuse_norm_quant, fuse_swiglu_quant) save on Qwen3-0.6B-shaped
decoder layers (qwen3_shapes; vocab 4096), per scheme: ops per layer before / after and activation bytes
read + written per token, both counted from the rewritten graph's tensor sizes (fake values), weights and
constants excluded. An op is a node that computes; views, getitem, splits and reshapes count as free (on
the NPU a reshape of a split piece may copy). Each layer is counted from the nodes its module stack or
its linears' tags place in a decoder layer, averaged over the layers.

--recipes counts the same per recipe on the default (fused) pipeline: no recipe, smooth, rotate and
smooth+rotate, each on the NPU graph with npu_rotate_quant and on a target lacking it (torchair GE: bmm + the
quantizer, as every target emitted before npu_rotate_quant was mirrored).

--perplexity also measures the shipped model (mxfx/data/tiny-qwen3-pydoc) on its held-out topics on the
reference target, with and without the fusions: they change numerics (the NPU's fused arithmetic)."""

import argparse
import math
import operator
import re

import torch
from pass_overhead import qwen3_06b_shaped_model, trace

import mxfx
import passes
from mxfx import evaluation, recipes, textdata
from mxfx.calibrating import calibrate
from mxfx.recovery.rotation import BlockRotation
from mxfx.schemes import SCHEMES
from mxfx.targets import GE_LACKS, get_target
from passes import PassContext, mxfx_tag, run_passes

aten = torch.ops.aten
FREE = {operator.getitem, aten.reshape.default, aten.view.default, aten._unsafe_view.default,
        aten.split_with_sizes.default, aten.sym_size.int, "view", "reshape", "transpose", "unsqueeze", "size",
        "contiguous", "permute", "expand", "_log_api_usage_once"}
LAYER = re.compile(r"layers[.\[](\d+)")


def _layer(node) -> int | None:
    """The decoder layer a node belongs to, from its module stack or its pass tag."""
    tag = mxfx_tag(node)
    names = [*tag.get("linears", []), tag.get("linear", "")]
    names += [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    found = next((m for m in map(LAYER.search, map(str, names)) if m), None)
    return int(found.group(1)) if found else None


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    return 0


def layer_costs(gm, weights: set[str], layers: int, tokens: int) -> tuple[float, float]:
    """(ops per layer, activation bytes read + written per token per layer)."""
    ops = nbytes = 0
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", node.target)
        if node.op not in ("call_function", "call_method") or node.target in FREE or name in FREE:
            continue
        if _layer(node) is None:
            continue
        ops += 1
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr" and n.name not in weights]
        nbytes += sum(_bytes(n.meta.get("val", n.meta.get("example_value"))) for n in inputs)
        nbytes += _bytes(node.meta.get("val", node.meta.get("example_value")))
    return ops / layers, nbytes / layers / tokens


def graph_costs(layers: int, seq: int) -> None:
    model = qwen3_06b_shaped_model(layers)
    ids = torch.randint(0, 4096, (1, seq), generator=torch.Generator().manual_seed(0))
    print(f"{layers}-layer Qwen3-0.6B-shaped model, {seq} tokens; per decoder layer:")
    print(f"{'scheme':<12}{'ops before':>11}{'ops after':>10}{'act. bytes/token before':>25}{'after':>10}  fused")
    for name in SCHEMES:
        gm, weights, _ = trace(model, ids)
        context = PassContext(name, get_target("reference"), weights)
        run_passes(gm, passes.UNFUSED_PASSES, context)
        ops0, bytes0 = layer_costs(gm, set(weights), layers, seq)
        report = run_passes(gm, passes.FUSION_PASSES, context)
        ops1, bytes1 = layer_costs(gm, set(weights), layers, seq)
        fused = ", ".join(f"{r.pass_name} {len(r.fused)}" for r in report.passes)
        print(f"{name:<12}{ops0:>11.1f}{ops1:>10.1f}{bytes0:>25,.0f}{bytes1:>10,.0f}  {fused}")


RECIPES = {"none": None, "smooth": recipes.Recipe(smooth_alpha=0.5),
           "rotate": recipes.Recipe(rotation=BlockRotation(32)),
           "smooth+rotate": recipes.Recipe(smooth_alpha=0.5, rotation=BlockRotation(32))}


def recipe_costs(layers: int, seq: int) -> None:
    model = qwen3_06b_shaped_model(layers)
    ids = torch.randint(0, 4096, (1, seq), generator=torch.Generator().manual_seed(0))
    calibration = calibrate(model, [ids], gram=False)
    targets = {"npu": get_target("reference"), "GE": get_target("reference").without(GE_LACKS)}
    print(f"\nops per decoder layer, default pipeline ({layers}-layer Qwen3-0.6B-shaped model):")
    print(f"{'scheme':<12}" + "".join(f"{name + ' ' + t:>20}" for name in RECIPES for t in targets))
    for name in recipes.RECOMMENDED:
        row = []
        for recipe in RECIPES.values():  # from the model, as the CLI builds it: o_proj's rotation folds
            scheme = name if recipe is None else recipes.apply(name, recipe, calibration, model)
            for target in targets.values():
                gm, weights, _ = trace(model, ids)
                run_passes(gm, passes.DEFAULT_PASSES, PassContext(scheme, target, weights))
                row.append(layer_costs(gm, set(weights), layers, seq)[0])
        print(f"{name:<12}" + "".join(f"{ops:>20.1f}" for ops in row))


def perplexity(max_tokens: int | None, seq: int, batch_size: int) -> None:
    model = evaluation.load_model(evaluation.SHIPPED_MODEL)
    stream = textdata.stream(textdata.texts(textdata.split()[1]))
    batches = evaluation.windows(stream, seq, max_tokens)
    _, loss = evaluation.predictions_and_loss(model, batches, batch_size, "bf16")
    print(f"shipped model, {batches[:, 1:].numel():,} held-out tokens: bf16 perplexity {math.exp(loss):.4f}")
    for name in SCHEMES:
        row = []
        for pipeline in (passes.UNFUSED_PASSES, passes.DEFAULT_PASSES):
            torch._dynamo.reset()
            backend = mxfx.backend(name, target="reference", passes=pipeline)
            compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
            predictions, loss = evaluation.predictions_and_loss(compiled, batches, batch_size, name)
            row.append((math.exp(loss), predictions))
        fusions = "; ".join(f"{r.pass_name} {r.summary()}" for r in backend.pipeline_reports[-1].passes[1:-1])
        (unfused, p0), (fused, p1) = row
        agree = (p0 == p1).float().mean().item()
        print(f"{name:<12} unfused {unfused:.4f}  fused {fused:.4f}  ({(fused / unfused - 1) * 100:+.2f}%)  "
              f"next token fused = unfused {agree:.1%}\n    {fusions}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--recipes", action="store_true")
    parser.add_argument("--perplexity", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens for --perplexity (default all)")
    args = parser.parse_args()
    graph_costs(args.layers, args.seq)
    if args.recipes:
        recipe_costs(args.layers, args.seq)
    if args.perplexity:
        perplexity(args.max_tokens, 256, 8)


if __name__ == "__main__":
    main()

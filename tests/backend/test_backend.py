"""mxfx_backend end to end on a small transformers Qwen3 (random weights from a config) on the
reference target: rewrites, numerics bit-exact to hand-swapped reference linears, generate() with a
static cache, caching of prepared weights, failure policy, dynamic shapes."""

import gc
import weakref

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters

import mxfx
from mxfx.dynamo_backend import Backend, MXFXCompileError
from mxfx.prepared import PreparedWeights
from mxfx.selection import SkipReason

from .. import reference_linear
from ..models import tiny_qwen3
from ..passes.graphs import Block, activation

SCHEMES = ["mxfp4_dual", "mxfp4_w4a8", "mxfp8", "mxfp4"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(batch=2, seq=16, seed=0):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qwen3_logits_bit_exact_to_hand_swapped_linears(scheme, record_property):
    model = tiny_qwen3()
    before = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    be = mxfx.backend(scheme, target="reference", fuse=False)  # the rewrite alone (fusions: tests/passes/test_fusions)
    with torch.no_grad():
        got = torch.compile(model, backend=be, fullgraph=True)(_ids()).logits
        expected = reference_linear.swapped(model, scheme)(_ids()).logits
        bf16 = model(_ids()).logits
    report = be.reports[-1]
    assert len(report.rewritten) == 14 and [r.fqn for r in report.skipped] == ["lm_head"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected), "the rewrite changed the numerics"
    assert all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.named_parameters())
    agreement = (got.argmax(-1) == bf16.argmax(-1)).float().mean().item()
    record_property("measured", f"{scheme}: next-token top-1 agreement with bf16 {agreement:.1%} (random-weight Qwen3)")


def test_generate_with_static_cache_does_not_recompile_after_warm_up():
    model = tiny_qwen3()
    model.forward = torch.compile(model.forward, backend=mxfx.backend("mxfp4_dual", target="reference"))
    prompt = _ids(batch=1, seq=8)
    kwargs = dict(max_new_tokens=16, do_sample=False, cache_implementation="static", disable_compile=True)
    first = model.generate(prompt, **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    again = model.generate(prompt, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs, "no recompiles after warm-up"
    assert first.shape == (1, 24) and torch.equal(first, again)
    reference = reference_linear.swapped(tiny_qwen3(), "mxfp4_dual").generate(prompt, **kwargs)
    assert torch.equal(first, reference), "greedy tokens differ from the hand-swapped reference model"


def test_recompile_for_a_new_shape_reuses_prepared_weights():
    model, cache = tiny_qwen3(), PreparedWeights()
    be = Backend("mxfp4_dual", target="reference", cache=cache)
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        compiled(_ids(seq=8))
        count, nbytes = len(cache), cache.nbytes
        compiled(_ids(seq=12))  # a second graph
    # per layer the cache keeps o, down and the merged q/k/v and gate/up constants (the siblings' own are
    # dropped): the recompile hits those 8, after preparing the 10 siblings again for the rewrite
    assert len(be.reports) == 2 and cache.hits == 8
    assert count == 8 and (len(cache), cache.nbytes) == (count, nbytes)
    bf16_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert nbytes / bf16_bytes == 4.3125 / 16, "FP4 codes + E8M0 per 32 + fp32 per 512, nothing else"


def test_a_second_compile_of_the_same_model_reuses_the_cache():
    model, cache = tiny_qwen3(), PreparedWeights()
    with torch.no_grad():
        for _ in range(2):
            torch._dynamo.reset()
            torch.compile(model, backend=Backend("mxfp8", target="reference", cache=cache))(_ids())
    assert len(cache) == 8 and cache.hits == 8  # 2 layers x (o, down, merged q/k/v, merged gate/up)


def test_cache_keeps_no_bf16_weight_alive():
    model, cache = tiny_qwen3(), PreparedWeights()
    weight = weakref.ref(model.model.layers[0].mlp.down_proj.weight)
    with torch.no_grad():
        torch.compile(model, backend=Backend("mxfp4_dual", target="reference", cache=cache))(_ids())
    assert len(cache) == 8
    del model
    torch._dynamo.reset()
    gc.collect()
    assert weight() is None and len(cache) == 0, "the weight and its cache entry are gone with the model"


def test_a_changed_weight_is_prepared_again():
    model, cache = tiny_qwen3(), PreparedWeights()
    with torch.no_grad():
        torch.compile(model, backend=Backend("mxfp8", target="reference", cache=cache))(_ids())
        model.model.layers[0].mlp.up_proj.weight.mul_(2)  # bumps the tensor's version
        torch._dynamo.reset()
        torch.compile(model, backend=Backend("mxfp8", target="reference", cache=cache))(_ids())
    assert cache.hits == 7  # all but layer 0's merged gate/up


def test_dynamic_batch_and_sequence():
    model = tiny_qwen3()
    be = mxfx.backend("mxfp8", target="reference", fuse=False)  # against unfused reference linears
    compiled = torch.compile(model, backend=be, dynamic=True, fullgraph=True)
    reference = reference_linear.swapped(model, "mxfp8")
    with torch.no_grad():
        for batch, seq in [(2, 8), (3, 5), (4, 17)]:  # sizes 0 and 1 are always specialized
            assert torch.equal(compiled(_ids(batch, seq)).logits, reference(_ids(batch, seq)).logits)
    assert len(be.reports) == 1, "one graph serves every batch and sequence length"


def test_model_without_linears_compiles_with_an_empty_report():
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.GELU())
    be = mxfx.backend(target="reference")
    x = activation((2, 64))
    with torch.no_grad(), pytest.warns(UserWarning, match=r"nothing quantized in this graph \(0 matmul weights\)"):
        assert torch.equal(torch.compile(model, backend=be, fullgraph=True)(x), model(x))
    assert be.reports[-1].linears == [] and "0 rewritten" in str(be.reports[-1])


@pytest.mark.parametrize("case", ["fp32 model", "include matches nothing"])
def test_a_compile_that_quantizes_nothing_warns(case):
    """Before: an fp32 model (every linear skipped) and an include matching nothing passed silently."""
    model = tiny_qwen3(layers=1)
    include = "*.no_such_linear" if case != "fp32 model" else None
    reason = "activation dtype" if case == "fp32 model" else "not included"
    be = mxfx.backend("mxfp8", target="reference", include=include)
    with torch.no_grad(), pytest.warns(UserWarning, match=f"nothing quantized in this graph .*{reason}"):
        torch.compile(model.float() if case == "fp32 model" else model, backend=be)(_ids())


def test_weights_updated_after_compiling_reach_the_compiled_model():
    """Before: in-place updates, load_state_dict and new Parameters were ignored (stale quantized weights)."""
    model = torch.nn.Sequential(torch.nn.Linear(512, 64, dtype=torch.bfloat16))
    compiled = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"))
    x, other = activation((2, 512)), torch.nn.Sequential(torch.nn.Linear(512, 64, dtype=torch.bfloat16))

    def expected():
        return reference_linear.linear("mxfp8", x, model[0].weight.detach(), model[0].bias.detach())

    updates = {
        "through .data": lambda: model[0].weight.data.mul_(-1),
        "in place under no_grad": lambda: model[0].bias.add_(1),
        "load_state_dict": lambda: model.load_state_dict(other.state_dict()),
        "a new Parameter": lambda: setattr(model[0], "weight", torch.nn.Parameter(torch.randn(64, 512).bfloat16())),
    }
    with torch.no_grad():
        assert torch.equal(compiled(x), expected())
        for name, update in updates.items():
            update()
            assert torch.equal(compiled(x), expected()), f"stale after an update {name}"


def test_a_gradient_through_a_quantized_linear_is_an_error():
    """Before: backward gave None to every weight behind a quantized linear (3 of 25 Qwen3 parameters)."""
    model = tiny_qwen3(layers=1)
    out = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"))(_ids(), labels=_ids())
    assert out.loss.requires_grad
    with pytest.raises(RuntimeError, match="a gradient reached the quantized linear model.layers.0.*torch.no_grad"):
        out.loss.backward()
    with torch.no_grad():
        torch._dynamo.reset()
        be = mxfx.backend("mxfp8", target="reference")
        torch.compile(model, backend=be)(_ids())
    graph = be.pipeline_reports[-1]
    assert graph.passes[0].rewritten, "under no_grad: no guard, nothing to refuse"


def test_nan_and_inf_inputs_behave_as_the_kernels_do():
    model, x = Block(), activation((2, 3, 512))
    x[0, 0, 5], x[0, 1, 100], x[1, 2, 7] = float("nan"), float("inf"), float("-inf")
    for scheme in SCHEMES:
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(model, backend=mxfx.backend(scheme, target="reference"), fullgraph=True)(x)
        expected = reference_linear.swapped(model, scheme)(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.isfinite(got[1, :2]).all(), "rows without inf/NaN stay finite"


@pytest.mark.parametrize("fullgraph", [True, False])
def test_a_graph_mxfx_cannot_handle_raises_with_or_without_fullgraph(fullgraph):
    """As the README says: torch 2.13 raises a backend's error either way (no silent graph break)."""
    model = tiny_qwen3(layers=1)
    be = mxfx.backend("mxfp4_dual", target="npu")  # torch_npu is not installed here
    with pytest.warns(UserWarning, match="needs torch_npu"), pytest.raises(BackendCompilerFailed) as failure:
        with torch.no_grad():
            torch.compile(model, backend=be, fullgraph=fullgraph)(_ids())
    assert isinstance(failure.value.inner_exception, MXFXCompileError) and "needs torch_npu" in str(failure.value)


def test_the_backend_has_a_readable_name():
    assert repr(mxfx.backend("mxfp8", target="reference")) == (
        "mxfx.backend(scheme='mxfp8', target='reference', inner='eager')")
    assert repr(mxfx.mxfx_backend) == "mxfx.backend(scheme='mxfp4_dual', target='auto', inner='eager')"


def test_fallback_eager_warns_and_runs_unquantized():
    model = tiny_qwen3(layers=1)
    be = mxfx.backend("mxfp4_dual", target="npu", fallback="eager")
    with pytest.warns(UserWarning, match="needs torch_npu"), torch.no_grad():
        got = torch.compile(model, backend=be, fullgraph=True)(_ids()).logits
    assert torch.equal(got, model(_ids()).logits)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown scheme"):
        mxfx.backend("int4")
    with pytest.raises(ValueError, match="unknown target"):
        mxfx.backend(target="tpu")
    with pytest.raises(ValueError, match="fallback"):
        mxfx.backend(fallback="yes")
    with pytest.raises(ValueError, match="inner"):
        mxfx.backend(inner="tvm")
    with pytest.raises(TypeError, match="report must be a callable"):
        mxfx.backend(report="print")
    with pytest.raises(ImportError, match="inner='torchair' needs torchair"):
        mxfx.backend(inner="torchair")


def test_backend_by_name_and_report_callback():
    model, reports = tiny_qwen3(layers=1), []
    with torch.no_grad():
        by_name = torch.compile(model, backend="mxfx")(_ids()).logits
        torch._dynamo.reset()
        direct = torch.compile(model, backend=mxfx.backend(target="reference", report=reports.append))(_ids()).logits
    assert torch.equal(by_name, direct) and len(reports) == 1 and len(reports[0].rewritten) == 7


@pytest.mark.slow
def test_inductor_inner_compiler_is_bit_exact_to_eager():
    model = tiny_qwen3()
    be = mxfx.backend("mxfp4_dual", target="reference", inner="inductor")
    with torch.no_grad():
        got = torch.compile(model, backend=be)(_ids()).logits
        torch._dynamo.reset()
        eager = torch.compile(model, backend=mxfx.backend("mxfp4_dual", target="reference"))(_ids()).logits
    assert len(be.reports[-1].rewritten) == 14
    assert torch.equal(got, eager), "inductor (with emulate_precision_casts) must compute what eager computes"


def test_compiling_with_grad_enabled_keeps_no_weight_alive():
    model, cache = tiny_qwen3(layers=1), PreparedWeights()
    weight = weakref.ref(model.model.layers[0].self_attn.o_proj.weight)
    torch.compile(model, backend=Backend("mxfp4_dual", target="reference", cache=cache))(_ids())  # no no_grad
    assert all(not t.requires_grad for tensors in cache.values() for t in tensors.values())
    del model
    torch._dynamo.reset()
    gc.collect()
    assert weight() is None and len(cache) == 0


def test_a_model_made_under_inference_mode():
    """Inference tensors have no version counter: the watch's sample sees the in-place update of up_proj,
    whose merged gate/up constants (inference tensors too) are merged again."""
    with torch.inference_mode():
        model = tiny_qwen3(layers=1)
        compiled = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"))
        got = compiled(_ids()).logits
        unfused = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference", fuse=False))
        assert torch.equal(unfused(_ids()).logits, reference_linear.swapped(model, "mxfp8")(_ids()).logits)
        model.model.layers[0].mlp.up_proj.weight.mul_(-1)
        updated = compiled(_ids()).logits
        torch._dynamo.reset()
        fresh = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"))(_ids()).logits
        assert not torch.equal(got, updated) and torch.equal(updated, fresh)


def test_a_new_bias_is_prepared_again():
    cache, weight = PreparedWeights(), torch.randn(64, 512, dtype=torch.bfloat16)
    scheme, target = mxfx.schemes.get_scheme("mxfp8"), mxfx.backend(target="reference").target
    for value in range(20):  # fresh bias tensors, whose ids the allocator may reuse
        bias = torch.full((64,), float(value), dtype=torch.bfloat16)
        assert cache.prepare(scheme, target, weight, bias, torch.bfloat16)["bias"][0].item() == value


@pytest.mark.parametrize("scheme", SCHEMES)
def test_empty_inputs_return_empty_outputs_as_eager(scheme):
    """Before: [0, K] and [B, 0, K] crashed at run time ("empty tensor"); serving loops and MoE zero-token
    paths send them. Dynamo gives a 0-sized dim a graph of its own, where the linear is left to F.linear."""
    linear = torch.nn.Linear(512, 64, dtype=torch.bfloat16)
    for shapes in ([(3, 512), (0, 512)], [(2, 3, 512), (2, 0, 512)]):
        torch._dynamo.reset()
        be = mxfx.backend(scheme, target="reference")
        compiled = torch.compile(linear, backend=be)
        with torch.no_grad():
            for shape in shapes:
                assert compiled(activation(shape)).shape == linear(activation(shape)).shape
        assert be.reports[0].rewritten and be.reports[-1].skipped[0].skip_reason is SkipReason.EMPTY

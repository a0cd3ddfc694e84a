"""Checkpoints loaded without bf16 weights (checkpoint.load(bf16_weights=False)): the quantized linears hold
their stored codes only, compile to the same logits as the dequantized model, refuse eager runs and
unrewritten linears, and measure (bf16 baseline streamed) exactly what the dequantized model does."""

import pytest
import torch

from mxfx import checkpoint, evaluation
from mxfx.checkpoint import PlaceholderWeightError
from mxfx.dynamo_backend import MXFXCompileError

from ..compiled import compiled

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _compiled_logits(model, **options):
    return compiled(model, IDS, **options)[0].logits


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.fixture(scope="module", params=["mxfp4_dual", "mxfp8"])
def folder(request, model_dir, tmp_path_factory):
    return checkpoint.quantize(model_dir, request.param, tmp_path_factory.mktemp("q") / "q")


def test_the_quantized_linears_hold_no_bf16_weights(folder):
    full, lean = checkpoint.load(folder), checkpoint.load(folder, bf16_weights=False)
    linears = checkpoint.stored_weights(lean)
    assert len(linears) == 14 and linears.keys() == checkpoint.stored_weights(full).keys()
    weights = [lean.get_submodule(name).weight for name in linears]
    assert all(w.shape == full.get_submodule(name).weight.shape and w.dtype == torch.bfloat16
               for name, w in zip(linears, weights))
    assert _storage_bytes(weights) == 2 * len(weights)  # one bf16 element each
    bf16 = sum(full.get_submodule(name).weight.nbytes for name in linears)
    parameters = {id(p): p for p in lean.parameters()}.values()
    assert _storage_bytes(parameters) == _storage_bytes({id(p): p for p in full.parameters()}.values()) - bf16 + 28
    codes = sum(t.nbytes for stored in linears.values() for t in stored.tensors.values())
    assert codes < bf16 / 1.9  # what the model holds for its linears: the codes (4.3 or 8.25 bits per weight)


def test_it_compiles_to_the_dequantized_models_logits(folder):
    expected = _compiled_logits(checkpoint.load(folder))
    assert torch.equal(_compiled_logits(checkpoint.load(folder, bf16_weights=False)), expected)


def test_eager_runs_are_refused_except_streamed_and_those_are_the_bf16_models(folder):
    full, lean = checkpoint.load(folder), checkpoint.load(folder, bf16_weights=False)
    with pytest.raises(PlaceholderWeightError, match="model.layers.0.self_attn.q_proj: loaded without its bf16 weight"):
        lean(IDS)
    with torch.no_grad(), checkpoint.dequantized(lean):
        streamed = lean(IDS).logits
    assert torch.equal(streamed, full(IDS).logits)
    with pytest.raises(PlaceholderWeightError):  # only inside the context
        lean(IDS)


def test_a_graph_that_leaves_a_placeholder_to_f_linear_is_refused_even_with_fallback(folder):
    lean = checkpoint.load(folder, bf16_weights=False)
    for fallback in (None, "eager"):
        with pytest.raises(Exception, match="model.layers.1.mlp.down_proj: loaded without bf16 weights") as raised:
            _compiled_logits(lean, exclude="*.1.mlp.down_proj", fallback=fallback)
        assert isinstance(raised.value.__cause__ or raised.value.inner_exception, MXFXCompileError)


def test_the_streamed_bf16_baseline_and_layer_sqnr_are_the_dequantized_models(folder):
    """What evaluate() runs on the bf16 side (the CLI test runs the whole of `mxfx eval` on such a model)."""
    batches = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    measured = []
    for model in (checkpoint.load(folder), checkpoint.load(folder, bf16_weights=False)):
        with checkpoint.dequantized(model):
            predictions, loss = evaluation.predictions_and_loss(model, batches, 2, "bf16")
            inputs = evaluation.layer_inputs(model, batches[:1, :-1])
        sqnr = evaluation.layer_sqnr(model, inputs, "modelslim", list(checkpoint.stored_weights(model)))
        measured.append((predictions, loss, inputs, sqnr))
    (p0, l0, i0, s0), (p1, l1, i1, s1) = measured
    assert torch.equal(p0, p1) and l0 == l1 and s0 == s1 and len(s1) == 14
    assert all(torch.equal(i0[name], i1[name]) for name in i0)

"""The graph Dynamo produces for a small transformers Qwen3: every decoder linear rewritten."""

import pytest
import torch

from passes import quantize_linears

from ..models import tiny_qwen3
from .graphs import dynamo_graph


@pytest.mark.parametrize("scheme", ["mxfp4_dual", "mxfp8"])
def test_qwen3_dynamo_graph(scheme):
    model = tiny_qwen3()
    gm, weights, inputs = dynamo_graph(model, torch.randint(0, 256, (1, 8)))
    report = quantize_linears(gm, scheme, "reference", weights)
    assert len(report.rewritten) == 14
    assert [r.fqn for r in report.skipped] == ["lm_head"]
    assert report.activation_quants == 8, "per layer: q/k/v share one, o one, gate/up share one, down one"
    assert report.rewritten[0].fqn == "model.layers.0.self_attn.q_proj"
    gm.graph.lint()
    with torch.no_grad():
        outputs = gm(*inputs)
    logits = next(o for o in outputs if o.shape == (1, 8, 256))  # the other outputs are the KV cache
    assert torch.isfinite(logits).all()

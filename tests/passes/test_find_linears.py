"""find_linears in the four graph forms: what is found, and the FQN, weight and bias it records."""

import operator

import torch

from passes import find_linears

from .graphs import Block, activation, aot_graph, dynamo_graph, export_graph, module_graph

FQNS = ["q", "k", "v", "o"]


def test_dynamo_graph():
    gm, weights, _ = dynamo_graph(Block(), activation())
    sites = find_linears(gm)
    assert [s.form for s in sites] == ["function"] * 4
    assert [s.fqn for s in sites] == FQNS
    assert all(s.weight in weights and s.bias in weights for s in sites)
    assert [(s.k, s.n) for s in sites] == [(512, 512)] * 4


def test_module_graph():
    sites = find_linears(module_graph(Block(), activation()))
    assert [(s.form, s.fqn, s.weight, s.bias, s.k, s.n) for s in sites] == [
        ("module", name, f"{name}.weight", f"{name}.bias", 512, 512) for name in FQNS
    ]


def test_export_graph():
    gm, weights, _ = export_graph(Block(), activation())
    sites = find_linears(gm)
    assert [s.form for s in sites] == ["aten_linear"] * 4
    assert [s.fqn for s in sites] == FQNS
    assert [s.weight for s in sites] == [f"p_{name}_weight" for name in FQNS]
    assert [(s.k, s.n) for s in sites] == [(512, 512)] * 4


def test_post_autograd_graph_mm_and_addmm():
    gm, weights, _ = aot_graph(Block(), activation())
    sites = find_linears(gm)
    assert [s.form for s in sites] == ["aten_mm"] * 4
    assert all(s.node.target == torch.ops.aten.addmm.default for s in sites)
    assert [s.weight for s in sites] == list(weights)[0::2] and [s.bias for s in sites] == list(weights)[1::2]
    assert all(s.input.target == torch.ops.aten.view.default for s in sites), "the flattening views stay"
    assert [(s.k, s.n) for s in sites] == [(512, 512)] * 4
    gm, _, _ = aot_graph(Block(bias=False), activation())
    assert [s.node.target for s in find_linears(gm)] == [torch.ops.aten.mm.default] * 4


def test_ignores_matmuls_that_are_not_linears():
    gm = torch.fx.symbolic_trace(lambda x, y: torch.mm(x, y) + operator.add(x, 1))
    assert find_linears(gm) == []


def test_k_and_n_orientation_in_every_form():
    model, x = torch.nn.Linear(512, 64, dtype=torch.bfloat16), activation((2, 512))
    graphs = [dynamo_graph(model, x)[0], module_graph(model, x), export_graph(model, x)[0], aot_graph(model, x)[0]]
    assert [(s.k, s.n) for gm in graphs for s in find_linears(gm)] == [(512, 64)] * 4

"""Small models and the graphs a user meets for them, in each IR form, with the weights a pass needs."""

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import ShapeProp


class Block(torch.nn.Module):
    """q/k/v-like siblings on one activation, then a linear on another: 4 linears, 2 activations."""

    def __init__(self, k=512, n=512, bias=True, dtype=torch.bfloat16):
        super().__init__()
        self.q = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
        self.k = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
        self.v = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
        self.o = torch.nn.Linear(n, k, bias=bias, dtype=dtype)
        for i, p in enumerate(self.parameters()):  # deterministic, well-scaled
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(dtype) * 0.05

    def forward(self, x):
        return self.o(self.q(x) * self.k(x) + self.v(x))


def activation(shape=(2, 3, 512), dtype=torch.bfloat16, seed=100):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def dynamo_graph(model, *inputs, **compile_kwargs):
    """The graph a torch.compile backend receives, and its weights by placeholder name."""
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, **compile_kwargs)(*inputs)
    gm = captured["gm"]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    weights = {name: t for name, t in zip(names, captured["inputs"]) if isinstance(t, torch.nn.Parameter)}
    return gm, weights, captured["inputs"]


def module_graph(model, x):
    """symbolic_trace: call_module nn.Linear; ShapeProp gives the shapes the rewrite needs."""
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    return gm


def export_graph(model, x):
    """torch.export: aten.linear.default; weights through the graph signature."""
    ep = torch.export.export(model, (x,))
    state = ep.state_dict
    weights = {name: state[fqn] for name, fqn in ep.graph_signature.inputs_to_parameters.items()}
    return ep.graph_module, weights, ep


def aot_graph(model, x):
    """A post-autograd graph: aten.t / aten.mm / aten.addmm with views around a 3-D input."""
    params = dict(model.named_parameters())
    names = list(params)

    def fn(x, *flat):
        return torch.func.functional_call(model, dict(zip(names, flat)), (x,))

    gm = make_fx(fn, tracing_mode="fake")(x, *params.values())
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    weights = dict(zip(placeholders[1:], params.values()))
    return gm, weights, [x, *params.values()]

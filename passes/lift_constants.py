"""lift_constants: turn the prepared constants a rewrite registered (get_attr nodes tagged "constant")
into graph inputs after the existing ones, with static fake values, so that a graph compiler such as
torchair can freeze them. Returns the tensors, in input order, in its report."""

import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .quantize_linears import mxfx_tag
from .report import LiftReport


def lift_constants(gm: fx.GraphModule, fake_mode: FakeTensorMode | None = None) -> LiftReport:
    graph, report = gm.graph, LiftReport()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last = placeholders[-1] if placeholders else None
    for node in [n for n in graph.nodes if n.op == "get_attr" and mxfx_tag(n).get("role") == "constant"]:
        tensor = gm.get_buffer(node.target)
        if last is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                last = graph.placeholder(node.target)
        else:
            with graph.inserting_after(last):
                last = graph.placeholder(node.target)
        last._dynamo_source = None
        fake = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else node.meta["val"]
        last.meta.update(val=fake, example_value=fake, mxfx=mxfx_tag(node))
        node.replace_all_uses_with(last)
        graph.erase_node(node)
        delattr(gm, node.target)
        report.names.append(node.target)
        report.constants.append(tensor)
        report.tags.append(mxfx_tag(node))
    graph.lint()
    gm.recompile()
    return report

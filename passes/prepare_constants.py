"""prepare_constants: prepare the constants the passes left deferred. The pipeline's rewrite (rewrite_linears)
and merge_siblings register each prepared tensor as a buffer holding a fake tensor (Scheme.fake_prepare:
the shapes, dtypes and strides of the scheme's fake kernels) tagged with its sources, so that a pass that
replaces constants (the siblings' by merged ones) costs no quantization and no memory. run_passes calls
this after the last pass: the deferred constants still in the graph are prepared, once per set of
sources, through the context's prepare / prepare_merged (the backend's cache), and each must match the
fake the graph was built with."""

import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from .quantize_linears import RewriteError, constant_sources, mxfx_tag, source_tensor


def _meta(t) -> tuple:
    return list(t.shape), t.dtype, t.stride()


def prepare_constants(gm: fx.GraphModule, context) -> None:
    """Prepare every set of constants of gm with a fake buffer, in place (all of the set's buffers become the
    prepared tensors, as an undeferred rewrite registers them)."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and mxfx_tag(node).get("role") == "constant":
            groups.setdefault(constant_sources(mxfx_tag(node)), []).append(node)
    for (pairs, dtype, scheme), nodes in groups.items():
        if not any(isinstance(gm.get_buffer(node.target), FakeTensor) for node in nodes):
            continue
        weights = [source_tensor(gm, context.weights, w) for w, _ in pairs]
        biases = [source_tensor(gm, context.weights, b) for _, b in pairs]
        with unset_fake_temporarily():  # real weights; aot_autograd runs an engine's passes under its fake mode
            if len(pairs) == 1:
                prepared = context.prepare(scheme, context.target, weights[0], biases[0], dtype)
            else:
                prepared = context.prepare_merged(list(scheme), context.target, weights, biases, dtype)
            for node in nodes:
                tag, was = mxfx_tag(node), node.meta["val"]
                tensor = prepared[tag["name"]]
                if _meta(tensor) != _meta(was):
                    raise RewriteError(f"linear {tag['linear']}: its prepared {tag['name']} is {_meta(tensor)} "
                                       f"(shape, dtype, strides), but the scheme's fake kernels gave {_meta(was)}")
                gm.register_buffer(node.target, tensor)
                fake = was.fake_mode.from_tensor(tensor, static_shapes=True)
                node.meta.update({key: fake for key in ("val", "example_value") if key in node.meta})

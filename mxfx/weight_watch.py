"""Weights changed after a compile: the compiled graph holds prepared constants, so an update of the
model's weights (load_state_dict, an in-place copy under no_grad, a new Parameter, a write through
`.data`) must reach them, or the graph would compute with stale weights.

Before each call the watch compares every source weight (and bias) of the graph's constants with what
they were prepared from: identity, version counter and data pointer (exact, and cheap), plus, for CPU
tensors, 16 elements sampled across the tensor, which catch writes through `.data` (those bypass the
version counter). A changed weight is prepared again and copied into its constants in place, so
inner compilers that froze the constants' addresses (torchair) read the new values too. Constants a
later pass built from several weights (merged siblings: tag "sources") are not prepared again: a change
of those weights raises, asking for a new compile, rather than running stale constants.
"""

import logging

import torch

from mxfx.targets import Target
from mxfx.tensor_cache import version

log = logging.getLogger("mxfx.backend")
SAMPLES = 16


def _sample(t: torch.Tensor) -> torch.Tensor | None:
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None  # a device tensor would need a synchronisation per call
    flat = t.detach().view(-1)
    return flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES].clone().view(torch.uint8)


def _state(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return id(t), version(t), t.data_ptr(), _sample(t)


def _same(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[:3] == b[:3] and (a[3] is None or b[3] is None or torch.equal(a[3], b[3]))


class WeightWatch:
    """One entry per prepared source: (weight input index, bias input index or None, scheme, dtype,
    linear, [(constant index, prepared name)], the sources' state when prepared)."""

    def __init__(self, placeholders: list[str], inputs: list, tags: list[dict], target: Target):
        self.target, self.groups = target, {}
        index = {name: i for i, name in enumerate(placeholders)}
        self.frozen = {}  # linear -> input indices of the weights its merged constants came from
        for position, tag in enumerate(tags):
            if "source" not in tag:
                inputs_of = [index[name] for pair in tag.get("sources", ()) for name in pair if name in index]
                self.frozen.setdefault(tag["linear"], inputs_of)
                continue
            weight, bias, dtype, scheme = tag["source"]
            if weight not in index or (bias is not None and bias not in index):
                continue  # a get_attr weight: not a graph input, nothing can replace it between calls
            group = self.groups.setdefault(tag["source"], [index[weight], None if bias is None else index[bias],
                                                           scheme, dtype, tag["linear"], []])
            group[5].append((position, tag["name"]))
        self.states = {key: (_state(inputs[g[0]]), _state(None if g[1] is None else inputs[g[1]]))
                       for key, g in self.groups.items()}
        self.frozen_states = {linear: [_state(inputs[i]) for i in positions]
                              for linear, positions in self.frozen.items()}

    def refresh(self, args: tuple, constants: list[torch.Tensor]) -> None:
        for linear, positions in self.frozen.items():
            if not all(_same(_state(args[i]), was) for i, was in zip(positions, self.frozen_states[linear])):
                raise RuntimeError(f"mxfx: the weights of the merged linears {linear} changed after compiling; merged "
                                   "constants are not prepared again: compile again (torch._dynamo.reset())")
        for key, (wi, bi, scheme, dtype, linear, slots) in self.groups.items():
            weight, bias = args[wi], None if bi is None else args[bi]
            now = (_state(weight), _state(bias))
            if all(_same(a, b) for a, b in zip(now, self.states[key])):
                continue
            log.info("mxfx: the weights of %s changed since they were prepared; preparing them again", linear)
            prepared = scheme.prepare(self.target, weight, bias, dtype)
            inference = any(constants[position].is_inference() for position, _ in slots)  # compiled in inference mode
            with torch.no_grad(), torch.inference_mode(inference):
                for position, name in slots:
                    if prepared[name].shape != constants[position].shape:
                        raise RuntimeError(f"mxfx: {linear}'s new weight gives {name} of shape "
                                           f"{list(prepared[name].shape)}, the compiled graph has "
                                           f"{list(constants[position].shape)}: compile again")
                    constants[position].copy_(prepared[name])
            self.states[key] = now

"""Weights changed after a compile: the compiled graph holds prepared constants, so an update of the
model's weights (load_state_dict, an in-place copy under no_grad, a new Parameter, a write through
`.data`) must reach them, or the graph would compute with stale weights.

Before each call the watch compares every source weight (and bias) of the graph's constants with what
they were prepared from: identity, version counter and data pointer (exact, and cheap), plus, for CPU
tensors, 16 elements sampled across the tensor, which catch writes through `.data` (those bypass the
version counter). A changed weight is prepared again and copied into its constants in place, so
inner compilers that froze the constants' addresses (torchair) read the new values too; constants a
later pass built from several weights (merged siblings: tag "sources") are merged again from all of them.
"""

import logging
from dataclasses import dataclass

import torch

from mxfx.prepared import prepare_merged
from mxfx.targets import Target
from mxfx.tensor_cache import version
from passes import constant_sources

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


@dataclass
class _Group:
    """Constants prepared from the same weights: pairs (weight input index, bias input index or None), one
    pair per linear (several for merged siblings), the scheme (merged: one per sibling) and dtype, and
    [(constant index, name)]."""

    pairs: list[tuple[int, int | None]]
    scheme: object
    dtype: torch.dtype
    linear: str
    slots: list[tuple[int, str]]
    states: list = None

    def tensors(self, args) -> list[tuple]:
        return [(args[w], None if b is None else args[b]) for w, b in self.pairs]

    def snapshot(self, args) -> list:
        return [(_state(w), _state(b)) for w, b in self.tensors(args)]

    def prepare(self, target: Target, args) -> dict[str, torch.Tensor]:
        pairs = self.tensors(args)
        if len(pairs) == 1:
            return self.scheme.prepare(target, *pairs[0], self.dtype)
        weights, biases = zip(*pairs)
        return prepare_merged(list(self.scheme), target, list(weights), list(biases), self.dtype)


class WeightWatch:
    """One group per set of prepared sources; their state when prepared is compared before each call."""

    def __init__(self, placeholders: list[str], inputs: list, tags: list[dict], target: Target):
        self.target, self.groups = target, {}
        index = {name: i for i, name in enumerate(placeholders)}
        for position, tag in enumerate(tags):
            sources = constant_sources(tag)
            if sources is None:
                continue
            pairs, dtype, scheme = sources
            if any(w not in index or (b is not None and b not in index) for w, b in pairs):
                continue  # a get_attr weight: not a graph input, nothing can replace it between calls
            key = (pairs, dtype, scheme)
            if key not in self.groups:
                self.groups[key] = _Group([(index[w], None if b is None else index[b]) for w, b in pairs],
                                          scheme, dtype, tag["linear"], [])
            self.groups[key].slots.append((position, tag["name"]))
        for group in self.groups.values():
            group.states = group.snapshot(inputs)

    def refresh(self, args: tuple, constants: list[torch.Tensor]) -> None:
        for group in self.groups.values():
            now = group.snapshot(args)
            if all(_same(a, b) for pair, was in zip(now, group.states) for a, b in zip(pair, was)):
                continue
            log.info("mxfx: the weights of %s changed since they were prepared; preparing them again", group.linear)
            prepared = group.prepare(self.target, args)
            inference = any(constants[position].is_inference() for position, _ in group.slots)  # compiled so
            with torch.no_grad(), torch.inference_mode(inference):
                for position, name in group.slots:
                    if prepared[name].shape != constants[position].shape:
                        raise RuntimeError(f"mxfx: {group.linear}'s new weight gives {name} of shape "
                                           f"{list(prepared[name].shape)}, the compiled graph has "
                                           f"{list(constants[position].shape)}: compile again")
                    constants[position].copy_(prepared[name])
            group.states = now

"""The stored codes of weights loaded from a quantized checkpoint: one explicit mapping from a weight
tensor to its stored tensors, which the `modelslim` selector and the stored schemes read.

mxfx.checkpoint.load fills it (with `bf16_weights=False`, under `placeholder` weights that hold no values);
whoever replaces or shards a loaded weight adds the new tensor's entry
(an entry is never carried over implicitly). Entries are weak (they go with their weight) and
remember the weight's version: a weight changed in place after loading no longer matches its codes,
and reading them then raises instead of running stale codes.
"""

from typing import Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary

from mxfx.tensor_cache import version


class StoredCodes(Protocol):
    """What a checkpoint stores for one linear (mxfx.checkpoint.stored.QuantizedWeight)."""

    type: str  # the checkpoint's type name, e.g. "W8A8_MXFP8"

    @property
    def scheme(self):  # the mxfx.schemes.Scheme that runs these codes
        ...

    def codes(self, device: torch.device) -> dict[str, torch.Tensor]:
        ...


class StaleStoredWeight(ValueError):
    """A loaded weight was changed in place: its stored codes no longer describe it."""


class StoredWeights:
    def __init__(self) -> None:
        self._entries = WeakIdKeyDictionary()  # weight -> (codes, its version when added)

    def add(self, weight: torch.Tensor, stored: StoredCodes) -> None:
        self._entries[weight] = (stored, version(weight))

    def __contains__(self, weight: torch.Tensor) -> bool:
        return weight in self._entries

    def get(self, weight: torch.Tensor) -> StoredCodes | None:
        entry = self._entries.get(weight)
        if entry is None:
            return None
        stored, added = entry
        if version(weight) != added:
            raise StaleStoredWeight(
                f"the weight was loaded as {stored.type} and changed in place since (version {added} -> "
                f"{version(weight)}): its stored codes no longer describe it; reload the checkpoint, or compile "
                "the changed model with an online scheme after dropping its entry (STORED_WEIGHTS.remove)")
        return stored

    def remove(self, weight: torch.Tensor) -> None:
        self._entries.pop(weight, None)


STORED_WEIGHTS = StoredWeights()  # process-wide: checkpoint.load adds to it, the schemes read it


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.nn.Parameter:
    """A weight of `shape` and `dtype` holding one element (NaN, every stride 0): what a linear loaded without
    its bf16 weight holds, its stored codes carrying the values. Anything that multiplies by it anyway
    gets NaN, not a plausible wrong answer."""
    value = torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)
    return torch.nn.Parameter(value, requires_grad=False)


def is_placeholder(weight: torch.Tensor) -> bool:
    """A weight with stored codes and no values of its own (`placeholder`)."""
    return weight.numel() > 1 and not any(weight.stride()) and weight in STORED_WEIGHTS

"""Values computed from tensors, kept while those tensors live."""

import weakref

import torch


def version(t: torch.Tensor) -> int:
    """A tensor's version counter; inference tensors have none (they cannot be changed in place)."""
    return 0 if t.is_inference() else t._version


class TensorCache:
    """Values keyed by their source tensors' identity and version (plus an extra key).

    Only weak references to the sources are held: an entry goes when a source tensor does, and an
    in-place change of a source (a new version) replaces its entry instead of adding one.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[list[weakref.ref], object]] = {}
        self._latest: dict[tuple, tuple] = {}  # sources' ids + extra key -> the current entry's key
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list:
        return [value for _, value in self._entries.values()]

    def get(self, sources: tuple[torch.Tensor, ...], compute, extra: tuple = ()):
        key = (*((id(t), version(t)) for t in sources), *extra)
        entry = self._entries.get(key)
        if entry is not None and all(ref() is t for ref, t in zip(entry[0], sources)):
            self.hits += 1
            return entry[1]
        value = compute()
        slot = (*(id(t) for t in sources), *extra)
        previous = self._latest.get(slot)
        self._entries.pop(previous, None)  # the value for an older version
        self._entries[key], self._latest[slot] = ([weakref.ref(t) for t in sources], value), key
        if previous is None:  # one finalizer per slot, however many versions its sources go through
            for t in sources:
                weakref.finalize(t, self._forget, slot)
        return value

    def discard(self, sources: tuple[torch.Tensor, ...], extra: tuple = ()) -> None:
        """Drop the entry of `sources` (any version) and `extra`, if there is one."""
        self._forget((*(id(t) for t in sources), *extra))

    def _forget(self, slot: tuple) -> None:
        self._entries.pop(self._latest.pop(slot, None), None)

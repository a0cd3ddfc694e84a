"""TensorCache: values live as long as their source tensors, one entry per source version."""

import gc

import torch

from mxfx.tensor_cache import TensorCache


def test_hits_versions_and_lifetime():
    cache, calls = TensorCache(), []
    a, b = torch.zeros(4), torch.ones(4)

    def compute():
        calls.append(1)
        return a.sum() + b.sum()  # noqa: F821 (`del a` below frees the tensor through this closure's cell)

    assert cache.get((a, b), compute, ("x",)).item() == 4 and cache.get((a, b), compute, ("x",)).item() == 4
    assert len(calls) == 1 and cache.hits == 1
    cache.get((a, b), compute, ("y",))  # another extra key: another entry
    assert len(cache) == 2
    a.add_(1)  # a new version: recomputed, and replaces the old entry
    assert cache.get((a, b), compute, ("x",)).item() == 8 and len(cache) == 2 and len(calls) == 3
    del a
    gc.collect()
    assert len(cache) == 0, "entries go with any of their sources"


def test_inference_tensors_have_no_version_but_are_cached():
    cache = TensorCache()
    with torch.inference_mode():
        t = torch.ones(3)
    assert cache.get((t,), lambda: 1) == 1 and cache.get((t,), lambda: 2) == 1


def test_one_finalizer_per_slot_however_many_versions():
    """A weight updated N times (weight reloads) used to accumulate N finalizers until it died."""
    import weakref

    cache, t = TensorCache(), torch.zeros(4)
    for _ in range(5):
        cache.get((t,), lambda: 1)
        t.add_(1)
    assert sum(1 for f in list(weakref.finalize._registry) if f.peek() and f.peek()[0] is t) == 1
    assert len(cache) == 1
    del t
    gc.collect()
    assert len(cache) == 0

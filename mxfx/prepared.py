"""The prepared-weight cache: what a scheme's `prepare` returns, kept per (weight, bias, scheme value,
target, activation dtype), so recompiles, second compiles and evaluations reuse it."""

import torch

from mxfx.metrics import nbytes
from mxfx.schemes import Scheme, Tensors
from mxfx.targets import Target
from mxfx.tensor_cache import TensorCache


class PreparedWeights(TensorCache):
    """The weight and bias are identified by identity and version, the scheme by its value (two schemes
    that differ in a parameter never share an entry). Weak references only: the bf16 weights stay the
    model's, and an entry goes when its weight does."""

    @property
    def nbytes(self) -> int:
        return sum(nbytes(tensors.values()) for tensors in self.values())

    def prepare(self, scheme: Scheme, target: Target, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> Tensors:
        sources = (weight,) if bias is None else (weight, bias)
        return self.get(sources, lambda: scheme.prepare(target, weight, bias, dtype),
                        (bias is None, scheme, target, dtype))


PREPARED = PreparedWeights()  # process-wide: a second torch.compile of the same model reuses it

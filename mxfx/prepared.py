"""The prepared-weight cache: what a scheme's `prepare` returns, kept per (weight, bias, scheme value,
target, activation dtype), so recompiles, second compiles and evaluations reuse it; and the merged
preparation of sibling linears (one matmul over their weights concatenated along N)."""

import torch

from mxfx.metrics import nbytes
from mxfx.schemes import Scheme, Tensors
from mxfx.targets import Target
from mxfx.tensor_cache import TensorCache


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along N (dim 0), bytewise for dtypes torch.cat has no CPU kernel for (float8)."""
    dtype = tensors[0].dtype
    if dtype.itemsize == 1 and dtype.is_floating_point:
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(dtype)
    return torch.cat(tensors)


def merge_codes(schemes: list[Scheme], target: Target, codes: list[Tensors], biases: list, dtype) -> Tensors:
    """The siblings' codes (each weight's by its own scheme) and biases concatenated along N, laid out by the
    first scheme. Exact for the per-row schemes: the codes of the concatenated weight are the concatenated
    codes. The schemes differ at most in their weights' own row transforms (v_proj's folded head rotation),
    never in the layout (merge_siblings checks)."""
    merged = {name: _cat([c[name] for c in codes]) for name in codes[0]}
    bias = None if biases[0] is None else torch.cat([s.output_bias(b) for s, b in zip(schemes, biases)])
    return schemes[0].layout(target, merged, bias, dtype)


@torch.no_grad()
def prepare_merged(schemes: list[Scheme], target: Target, weights: list[torch.Tensor], biases: list,
                   dtype) -> Tensors:
    """What one matmul over sibling linears reads (merge_codes), each weight quantized once."""
    codes = [scheme.weight_codes(target, w, dtype) for scheme, w in zip(schemes, weights)]
    return merge_codes(schemes, target, codes, biases, dtype)


@torch.no_grad()
def fake_prepare_merged(schemes: list[Scheme], target: Target, weights: list[torch.Tensor], biases: list, dtype,
                        fake_mode) -> Tensors:
    """prepare_merged with the weights' tensors as fakes of fake_mode (Scheme.fake_prepare), nothing quantized."""
    codes = [scheme.fake_codes(target, w, dtype, fake_mode) for scheme, w in zip(schemes, weights)]
    return merge_codes(schemes, target, codes, biases, dtype)


def _sources(weights: list[torch.Tensor], biases: list) -> tuple[torch.Tensor, ...]:
    return (*weights, *(b for b in biases if b is not None))


class PreparedWeights(TensorCache):
    """The weight and bias are identified by identity and version, the scheme by its value (two schemes
    that differ in a parameter never share an entry). Weak references only: the bf16 weights stay the
    model's, and an entry goes when its weight does."""

    @property
    def nbytes(self) -> int:
        return sum(nbytes(tensors.values()) for tensors in self.values())

    def prepare(self, scheme: Scheme, target: Target, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> Tensors:
        return self.get(_sources([weight], [bias]), lambda: scheme.prepare(target, weight, bias, dtype),
                        (bias is None, scheme, target, dtype))

    def discard_prepared(self, scheme: Scheme, target: Target, weight: torch.Tensor, bias: torch.Tensor | None,
                         dtype: torch.dtype) -> None:
        """Drop a linear's prepared tensors (merge_siblings replaced them with merged ones)."""
        self.discard(_sources([weight], [bias]), (bias is None, scheme, target, dtype))

    def prepare_merged(self, schemes: list[Scheme], target: Target, weights: list[torch.Tensor], biases: list,
                       dtype: torch.dtype) -> Tensors:
        return self.get(_sources(weights, biases), lambda: prepare_merged(schemes, target, weights, biases, dtype),
                        ("merged", len(weights), biases[0] is None, tuple(schemes), target, dtype))


PREPARED = PreparedWeights()  # process-wide: a second torch.compile of the same model reuses it

"""Small measures shared by the rewrite report, the backend and the evaluation."""

from collections.abc import Iterable

import torch


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of the tensors' elements (a view counts its own elements, not its storage)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, in float64."""
    reference = reference.double()
    error = reference - approximation.double()
    return (10 * torch.log10(reference.pow(2).sum() / error.pow(2).sum())).item()


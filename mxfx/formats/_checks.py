"""Input checks shared by the format functions: every refusal is a ValueError that names the problem."""

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_input(x: torch.Tensor, what: str, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{what}: unsupported dtype {x.dtype}; supported: {names}")
    if x.dim() == 0:
        raise ValueError(f"{what}: needs a tensor of rank >= 1 (the last axis is quantized), got a scalar")
    if x.numel() == 0:
        raise ValueError(f"{what}: empty tensor of shape {list(x.shape)} (the Ascend kernels refuse empty tensors)")


def check_last_dim_even(x: torch.Tensor, what: str) -> None:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"{what}: two 4-bit values pack into a byte, so the last dim must be even, "
                         f"got shape {list(x.shape)}")

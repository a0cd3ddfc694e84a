"""SmoothQuant scales (Xiao et al. 2022; msmodelslim iter_smooth): per input channel
s = amax_x^alpha / amax_w^(1 - alpha), amax_w over every linear reading the activation, so x*s and W/s
have balanced ranges and (x*s)(W/s)^T = x W^T."""

import torch

SCALE_MIN = 1e-5  # msmodelslim's scale_min: a dead channel gets a finite scale


def smooth_scale(amax_x: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] fp32 for an activation with channel abs-max amax_x [K], read by linears of `weights` [N_i, K]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    amax_w = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = amax_x.float().clamp(min=SCALE_MIN).pow(alpha) / amax_w.clamp(min=SCALE_MIN).pow(1.0 - alpha)
    return s.clamp(min=SCALE_MIN)

"""SmoothQuant scales (Xiao et al. 2022; msmodelslim iter_smooth): per input channel
s_sq = amax_x^alpha / amax_w^(1 - alpha), amax_w over every linear reading the activation; the activation is
divided by s_sq and the weight multiplied by it, so the two have balanced ranges. mxfx names the activation's
multiplier s = 1 / s_sq (what npu_dynamic_dual_level_mx_quant's smooth_scale and msmodelslim's mul_scale
multiply x by): x * s and W / s, (x*s)(W/s)^T = x W^T."""

import torch

SCALE_MIN = 1e-5  # msmodelslim's scale_min on s_sq: a dead channel gets a finite scale


def smooth_scale(amax_x: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] fp32, the multiplier of an activation with channel abs-max amax_x [K] read by linears of
    `weights` [N_i, K]: amax_w^(1 - alpha) / amax_x^alpha, so that amax_x * s = (amax_x * amax_w)^(1 - alpha)
    and amax_w / s = (amax_x * amax_w)^alpha (alpha 0.5: equal ranges; an outlier channel shrinks)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    amax_w = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s_sq = amax_x.float().clamp(min=SCALE_MIN).pow(alpha) / amax_w.clamp(min=SCALE_MIN).pow(1.0 - alpha)
    return 1.0 / s_sq.clamp(min=SCALE_MIN)

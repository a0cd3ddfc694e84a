"""Linears composed by hand from the mxfx reference ops, per scheme: the independent expectation for what
the graph rewrite must compute (written from the scheme table, not from mxfx.schemes)."""

import copy

import torch

import mxfx.ops  # noqa: F401  (registers torch.ops.mxfx)

mx = torch.ops.mxfx
E8M0, E4M3, FP4 = 293, 292, 296


def prepare(scheme: str, w: torch.Tensor, b: torch.Tensor | None) -> tuple:
    if scheme == "mxfp4_dual":
        qw, l0w, l1w = mx.npu_dynamic_dual_level_mx_quant(w)
        return mx.npu_format_cast(qw.view(torch.int8), 29), l0w.t().contiguous(), l1w, None if b is None else b.float()
    fp4 = scheme in ("mxfp4_w4a8", "mxfp4")
    qw, sw = mx.npu_dynamic_mx_quant(w, dst_type=FP4 if fp4 else E4M3)
    bias = None if b is None else (b.reshape(1, -1) if scheme == "mxfp4_w4a8" else b.float())
    return qw.t(), sw.transpose(0, 1), bias


def apply(scheme: str, x: torch.Tensor, prepared: tuple, n: int) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    out_dtype = {torch.bfloat16: 15, torch.float16: 5}[x.dtype]
    if scheme == "mxfp4_dual":
        w, l0w, l1w, bias = prepared
        qx, l0x, l1x = mx.npu_dynamic_dual_level_mx_quant(x2d)
        y = mx.npu_dual_level_quant_matmul(qx, w, l0x, l0w, l1x, l1w, bias=bias, output_dtype=out_dtype)
    elif scheme == "mxfp4":  # vllm-ascend W4A4_MXFP4: FP4 activations rounded half away from zero
        w, sw, bias = prepared
        qx, sx = mx.npu_dynamic_mx_quant(x2d, dst_type=FP4, round_mode="round")
        y = mx.npu_quant_matmul(qx, w, sw, pertoken_scale=sx, scale_dtype=E8M0, pertoken_scale_dtype=E8M0,
                                output_dtype=out_dtype, bias=bias, x1_dtype=FP4, x2_dtype=FP4, group_sizes=[1, 1, 32])
    else:
        fp4 = scheme == "mxfp4_w4a8"
        w, sw, bias = prepared
        qx, sx = mx.npu_dynamic_mx_quant(x2d, dst_type=E4M3)
        y = mx.npu_quant_matmul(qx, w, sw, pertoken_scale=sx, scale_dtype=E8M0, pertoken_scale_dtype=E8M0,
                                output_dtype=out_dtype, bias=bias, x2_dtype=FP4 if fp4 else None,
                                group_sizes=[0, 0, 32] if fp4 else [1, 1, 32])
    return y.reshape(*x.shape[:-1], n)


def linear(scheme: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return apply(scheme, x, prepare(scheme, w, b), w.shape[0])


class ReferenceLinear(torch.nn.Module):
    def __init__(self, scheme: str, layer: torch.nn.Linear):
        super().__init__()
        self.scheme, self.n = scheme, layer.out_features
        self.prepared = prepare(scheme, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())

    def forward(self, x):
        return apply(self.scheme, x, self.prepared, self.n)


def swapped(model: torch.nn.Module, scheme: str, keep=("lm_head",)) -> torch.nn.Module:
    """A copy of model with every nn.Linear except `keep` replaced by a ReferenceLinear."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name not in keep:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ReferenceLinear(scheme, module))
    return model

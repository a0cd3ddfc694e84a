"""A stand-in `npu` op namespace for tests on machines without torch_npu: the torch_npu schemas (taken
from the mxfx mirrors) with the mxfx reference kernels, so graphs emitted for target "npu" run here.
The FP4 C0_16 NZ cast that only the NPU target emits keeps the logical layout, as the reference does."""

import torch

import mxfx.ops  # noqa: F401

OPS = ("npu_dynamic_dual_level_mx_quant", "npu_dual_level_quant_matmul", "npu_dynamic_mx_quant",
       "npu_quant_matmul", "npu_format_cast")


def _format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
    if customize_dtype is None and input_dtype is None:
        return torch.ops.mxfx.npu_format_cast(self, acl_format)
    return self.clone()


def register() -> torch.library.Library:
    """Define torch.ops.npu.* (keep the returned library alive while the ops are needed)."""
    library = torch.library.Library("npu", "FRAGMENT")
    for name in OPS:
        mirror = getattr(torch.ops.mxfx, name).default
        library.define(str(mirror._schema).removeprefix("mxfx::"))
        kernel = _format_cast if name == "npu_format_cast" else mirror
        library.impl(name, kernel, "CompositeExplicitAutograd")
    return library

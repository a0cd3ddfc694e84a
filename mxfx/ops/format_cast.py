"""mxfx::npu_format_cast: torch_npu's storage-format cast. On an NPU, FRACTAL_NZ (29) changes the hidden
storage and keeps the logical shape; the reference cannot hide a layout, so it returns the emulated NZ
tensor [ceil(C/c0), ceil(R/16), 16, c0] (mxfx.formats.nd_to_nz), and the reference matmuls that take
NZ weights expect exactly that."""

import torch

from mxfx.formats import nd_to_nz

from .dtypes import ACL_FORMAT_FRACTAL_NZ

torch.library.define(
    "mxfx::npu_format_cast",
    "(Tensor self, int acl_format, *, int? customize_dtype=None, int? input_dtype=None) -> Tensor",
)


def _check(self, acl_format, customize_dtype, input_dtype):
    if acl_format != ACL_FORMAT_FRACTAL_NZ:
        raise ValueError(f"npu_format_cast: the reference emulates only FRACTAL_NZ (29), got acl_format={acl_format}")
    if customize_dtype is not None or input_dtype is not None:
        raise ValueError(
            "npu_format_cast: customize_dtype/input_dtype select NZ variants (e.g. the FP4 C0_16 layout) whose "
            "byte order is not verified; the reference emulates only the plain NZ cast"
        )
    if self.dim() != 2:
        raise ValueError(f"npu_format_cast: the reference takes a 2-D tensor, got shape {list(self.shape)}")


@torch.library.register_kernel("mxfx::npu_format_cast", ("cpu", "cuda"))
def _format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
    _check(self, acl_format, customize_dtype, input_dtype)
    return nd_to_nz(self)


@torch.library.register_fake("mxfx::npu_format_cast")
def _format_cast_fake(self, acl_format, *, customize_dtype=None, input_dtype=None):
    _check(self, acl_format, customize_dtype, input_dtype)
    rows, cols = self.shape
    c0 = 32 // self.element_size()
    return self.new_empty(((cols + c0 - 1) // c0, (rows + 15) // 16, 16, c0))

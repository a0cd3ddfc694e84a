"""mxfx::npu_format_cast: torch_npu's storage-format cast. On an NPU, FRACTAL_NZ (29) changes the hidden
storage and keeps the logical shape; the reference cannot hide a layout, so it returns the emulated NZ
tensor [ceil(C/c0), ceil(R/16), 16, c0] (mxfx.formats.nd_to_nz), and the reference matmuls that take
NZ weights expect exactly that.

The two casts the MX schemes make (aclnnNpuFormatCastCalculateSizeAndFormat, hicann/ops-math
conversion/npu_format_cast: C0 = 32 bytes / size of additionalDtype, counted in the source's elements):
- customize_dtype omitted or equal to the tensor's dtype (int8 for the dual-level FP4 weight): plain NZ,
  c0 = 32 bytes;
- input_dtype=float4_e2m1fn_x2 with customize_dtype=float8_e4m3fn (vllm-ascend's W4A8 weight, uint8
  [N, K/2] read as FP4 [N, K]): c0 = 32 FP4 elements = 16 bytes, so the bytes are [ceil(K/32),
  ceil(N/16), 16, 16], each fractal row 16 consecutive bytes of a weight row (element 2i in the low
  nibble, as in ND).
"""

import torch

from mxfx.formats import nd_to_nz

from .dtypes import ACL_FORMAT_FRACTAL_NZ, dtype_arg

torch.library.define(
    "mxfx::npu_format_cast",
    "(Tensor self, int acl_format, *, int? customize_dtype=None, int? input_dtype=None) -> Tensor",
)

_OWN_DTYPES = ("int8", "uint8", "int32", "float32", "float16", "bfloat16", "float8_e4m3fn")
FP4_NZ_C0_BYTES = 16  # c0 = 32 FP4 elements


def _c0(self, acl_format, customize_dtype, input_dtype) -> int:
    """Bytes per fractal row of the NZ this call makes, or a ValueError naming what is not emulated."""
    op = "npu_format_cast"
    if acl_format != ACL_FORMAT_FRACTAL_NZ:
        raise ValueError(f"{op}: the reference emulates only FRACTAL_NZ (29), got acl_format={acl_format}")
    if self.dim() != 2:
        raise ValueError(f"{op}: the reference takes a 2-D tensor, got shape {list(self.shape)}")
    own = str(self.dtype).removeprefix("torch.")
    if input_dtype is not None:
        dtype_arg(input_dtype, "input_dtype", op, ("float4_e2m1fn_x2",))
        dtype_arg(customize_dtype, "customize_dtype", op, ("float8_e4m3fn",))
        if self.dtype not in (torch.uint8, torch.int8):
            raise ValueError(
                f"{op}: packed FP4 (input_dtype=float4_e2m1fn_x2) must be uint8/int8 bytes, got {self.dtype}")
        return FP4_NZ_C0_BYTES
    if customize_dtype is not None and own in _OWN_DTYPES:
        dtype_arg(customize_dtype, "customize_dtype", op, (own,))
    elif customize_dtype is not None:
        raise ValueError(f"{op}: customize_dtype with a {self.dtype} tensor is not emulated")
    return 32 // self.element_size()


@torch.library.register_kernel("mxfx::npu_format_cast", ("cpu", "cuda"))
def _format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
    return nd_to_nz(self, _c0(self, acl_format, customize_dtype, input_dtype) // self.element_size())


@torch.library.register_fake("mxfx::npu_format_cast")
def _format_cast_fake(self, acl_format, *, customize_dtype=None, input_dtype=None):
    c0 = _c0(self, acl_format, customize_dtype, input_dtype) // self.element_size()
    rows, cols = self.shape
    return self.new_empty(((cols + c0 - 1) // c0, (rows + 15) // 16, 16, c0))

"""The integer dtype codes torch_npu's operator schemas take (`int output_dtype`, `int dst_type`, ...)."""

import torch

# c10::ScalarType numbers, as torch_npu's `int output_dtype` arguments take them
SCALAR_TYPE = {torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}
SCALAR_TYPE_DTYPE = {code: dtype for dtype, code in SCALAR_TYPE.items()}

# torch_npu's own dtype enum (op-plugin _meta_registrations.py): dtypes torch has no ScalarType for
FLOAT8_E4M3FN = 292
FLOAT8_E8M0FNU = 293
FLOAT4_E2M1FN_X2 = 296

ACL_FORMAT_FRACTAL_NZ = 29


def from_scalar_type(code: int) -> torch.dtype:
    if code not in SCALAR_TYPE_DTYPE:
        raise ValueError(f"output_dtype {code} is not supported; use 15 (bf16), 5 (fp16) or 6 (fp32)")
    return SCALAR_TYPE_DTYPE[code]

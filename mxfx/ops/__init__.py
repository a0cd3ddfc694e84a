"""torch.library ops in the `mxfx` namespace that mirror the torch_npu operators the schemes use
(same argument names, order, defaults, output shapes and dtypes), each with a CPU reference kernel
built on mxfx.formats and a fake kernel for tracing. Importing this package registers them."""

from . import (  # noqa: F401  (registration)
    format_cast,
    inference_only,
    matmul,
    norm_quant,
    quant,
    rotate_quant,
    swiglu_quant,
    weight_quant,
)

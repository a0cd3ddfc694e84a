"""mxfx: MXFP-quantized linears for Ascend NPUs through torch.compile, with a bit-exact CPU reference.

`import mxfx` never imports torch_npu.
"""

from .backend import MXFXCompileError, backend, mxfx_backend

__all__ = ["MXFXCompileError", "backend", "mxfx_backend"]
__version__ = "0.1.0"

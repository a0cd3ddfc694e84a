"""mxfx: MXFP-quantized linears for Ascend NPUs through torch.compile, with a bit-exact CPU reference.

The names below are loaded on first use (PEP 562), so `import mxfx.formats` stays light: it loads
neither the passes nor the backend. `import mxfx` never imports torch_npu.
"""

import importlib

_EXPORTS = {
    "Backend": "mxfx.dynamo_backend",
    "Calibration": "mxfx.calibration",
    "MXFXCompileError": "mxfx.dynamo_backend",
    "backend": "mxfx.dynamo_backend",
    "calibrate": "mxfx.calibrating",
    "mxfx_backend": "mxfx.dynamo_backend",
    "torchair_inner": "mxfx.dynamo_backend",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mxfx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

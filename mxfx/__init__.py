"""mxfx: MXFP-quantized linears for Ascend NPUs through torch.compile, with a bit-exact CPU reference."""

__version__ = "0.1.0"

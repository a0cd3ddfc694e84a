"""Accuracy recovery numerics: block rotations, smoothing scales, and weight codes on the MX grids (GPTQ,
per-block MSE scale search). Plain tensors in and out; the schemes that apply them are in mxfx.recipes."""

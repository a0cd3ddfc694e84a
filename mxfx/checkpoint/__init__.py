"""Quantized checkpoints: msmodelslim's layouts read (MX and int4), mxfx's quantized models written in
the same layouts, so quantization is done once. stored.py: one record per stored type (its tensors,
its codes, the scheme that runs it); read.py: folder -> model, streamed; write.py: bf16 folder ->
quantized folder, streamed; stored_linear.py: linears that hold their codes only (load(bf16_weights=False))."""

from .read import DESCRIPTION, FLOAT, load, read_description, scheme_of, stored_weights
from .stored import TYPES, WRITTEN, CheckpointError, QuantizedWeight, StoredType, pack_int4_rows
from .stored_linear import PlaceholderWeightError, StoredLinear, dequantized
from .write import WRITTEN_TYPES, quantize

__all__ = ["DESCRIPTION", "FLOAT", "TYPES", "WRITTEN", "WRITTEN_TYPES", "CheckpointError", "PlaceholderWeightError",
           "QuantizedWeight", "StoredLinear", "StoredType", "dequantized", "load", "pack_int4_rows", "quantize",
           "read_description", "scheme_of", "stored_weights"]

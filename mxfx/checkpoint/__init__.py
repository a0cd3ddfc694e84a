"""Quantized checkpoints: msmodelslim's layouts read (MX and int4), mxfx's quantized models written in
the same layouts, so quantization is done once. stored.py: what each type stores and how it runs;
read.py: folder -> model, streamed; write.py: bf16 folder -> quantized folder, streamed."""

from .read import DESCRIPTION, FLOAT, load, read_description, scheme_of
from .stored import CheckpointError, Int4Weight, QuantizedWeight
from .write import WRITTEN_TYPES, quantize

__all__ = ["DESCRIPTION", "FLOAT", "WRITTEN_TYPES", "CheckpointError", "Int4Weight", "QuantizedWeight", "load", "quantize",
           "read_description", "scheme_of"]

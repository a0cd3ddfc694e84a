"""Peak memory of writing and of loading a quantized checkpoint of a Qwen3-0.6B-shaped model
(qwen3_shapes.qwen3_06b_shaped), each step in a fresh process, as a multiple of the model's bf16 weight bytes
above the process's level before the step: private RSS (the process's own memory) and all RSS (also the
pages of the memory-mapped safetensors files it has read, which the kernel can drop). The writer streams
tensor by tensor into shards (bound: one shard plus the largest tensor and its codes); the loader copies
each tensor out of the file and keeps the bf16 model plus each linear's stored codes (its floor),
reading one linear at a time."""

import argparse
import ctypes
import multiprocessing
import tempfile
from pathlib import Path

import torch
from memory import PeakRSS, private_rss, rss
from qwen3_shapes import qwen3_06b_shaped
from transformers import Qwen3ForCausalLM

from mxfx import checkpoint


def _write(bf16, out, scheme, shard_bytes):
    return checkpoint.quantize(bf16, scheme, out, shard_bytes=shard_bytes)


def _measured(step, *args) -> dict[str, int]:
    """Peak private and all RSS during `step(*args)` and private RSS held after it, in bytes above the
    levels before."""
    base, base_private = rss(), private_rss()
    with PeakRSS() as peak:
        result = step(*args)
    held = private_rss() - base_private
    ctypes.CDLL(None).malloc_trim(0)  # glibc: give back the freed heap that the temporaries fragmented
    trimmed = private_rss() - base_private
    del result
    return {"private": peak.peak_private - base_private, "all": peak.peak - base, "held": held, "trimmed": trimmed}


def _in_child(queue, step, *args):
    queue.put(_measured(step, *args))


def measure_in_fresh_process(step, *args) -> dict[str, int]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_in_child, args=(queue, step, *args))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--scheme", default="mxfp4_dual", choices=sorted(checkpoint.WRITTEN_TYPES))
    parser.add_argument("--shard-mib", type=int, default=64)
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        bf16, out = Path(tmp) / "bf16", Path(tmp) / "quantized"
        model = Qwen3ForCausalLM(qwen3_06b_shaped(args.layers)).to(torch.bfloat16)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        linear_bytes = sum(m.weight.numel() * 2 for n, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear) and n != "lm_head")
        model.save_pretrained(bf16)
        del model
        write = measure_in_fresh_process(_write, bf16, out, args.scheme, args.shard_mib * mib)
        stored_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        load = measure_in_fresh_process(checkpoint.load, out)

    float_bytes = weight_bytes - linear_bytes
    floor = weight_bytes + stored_bytes - float_bytes  # FLOAT tensors are both in the model and the file
    print(f"{args.layers}-layer Qwen3-0.6B-shaped model: {weight_bytes / mib:.0f} MiB of bf16 weights (largest tensor "
          f"{largest / mib:.0f} MiB); {args.scheme} checkpoint {stored_bytes / mib:.0f} MiB "
          f"in shards of {args.shard_mib} MiB")
    for step, peaks in (("write", write), ("load", load)):
        print(f"{step:5s}  peak private {peaks['private'] / mib:5.0f} MiB "
              f"= {peaks['private'] / weight_bytes:.3f} x bf16, "
              f"peak with mapped file pages {peaks['all'] / mib:5.0f} MiB = {peaks['all'] / weight_bytes:.3f} x bf16")
    print(f"load   held after loading {load['held'] / mib:.0f} MiB private, {load['trimmed'] / mib:.0f} MiB after "
          f"malloc_trim; floor (bf16 model + stored codes) {floor / mib:.0f} MiB = {floor / weight_bytes:.3f} x bf16")


if __name__ == "__main__":
    main()

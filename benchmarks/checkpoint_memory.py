"""Peak memory of writing and of loading a quantized checkpoint of a Qwen3-0.6B-shaped model
(memory.qwen3_06b_shaped), each step in a fresh process: its peak private RSS (memory-mapped file pages
left out) above its level before the step, as a multiple of the model's bf16 weight bytes. The writer
streams tensor by tensor into shards (its bound: one shard plus the largest tensor and its codes); the
loader builds the bf16 model with each linear's stored codes attached (its floor: bf16 bytes + stored
bytes), reading one linear at a time."""

import argparse
import multiprocessing
import tempfile
from pathlib import Path

import torch
from memory import PeakRSS, private_rss, qwen3_06b_shaped
from transformers import Qwen3ForCausalLM

from mxfx import checkpoint


def _write(bf16, out, scheme, shard_bytes):
    return checkpoint.quantize(bf16, scheme, out, shard_bytes=shard_bytes)


def _measured(step, *args) -> tuple[int, int]:
    """(peak, held at the end) bytes of private RSS above the level before `step(*args)`."""
    baseline = private_rss()
    with PeakRSS(private_rss) as peak:
        result = step(*args)
    held = private_rss() - baseline
    del result
    return peak.peak - baseline, held


def _in_child(queue, step, *args):
    queue.put(_measured(step, *args))


def measure_in_fresh_process(step, *args) -> tuple[int, int]:
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
        model.save_pretrained(bf16)
        del model
        write_peak, _ = measure_in_fresh_process(_write, bf16, out, args.scheme, args.shard_mib * mib)
        stored_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        load_peak, held = measure_in_fresh_process(checkpoint.load, out)

    print(f"{args.layers}-layer Qwen3-0.6B-shaped model: {weight_bytes / mib:.0f} MiB of bf16 weights (largest tensor "
          f"{largest / mib:.0f} MiB); {args.scheme} checkpoint {stored_bytes / mib:.0f} MiB in shards of {args.shard_mib} MiB")
    print(f"write: peak {write_peak / mib:.0f} MiB = {write_peak / weight_bytes:.3f} x bf16 weight bytes")
    print(f"load:  peak {load_peak / mib:.0f} MiB = {load_peak / weight_bytes:.3f} x bf16, held after loading "
          f"{held / mib:.0f} MiB (floor: bf16 + stored = {(weight_bytes + stored_bytes) / mib:.0f} MiB, less the FLOAT "
          "tensors stored twice)")


if __name__ == "__main__":
    main()

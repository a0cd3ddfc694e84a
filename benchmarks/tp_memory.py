"""Tensor parallelism on a Qwen3-0.6B-shaped model (qwen3_shapes.qwen3_06b_shaped): the peak private RSS of
loading its quantized checkpoint whole (TP=1) and as each rank of TP=2 (mxfx.checkpoint.load with
tp_rank/tp_size, each step in a fresh process, no group needed to load), against each one's floor (the
bf16 model it builds plus its stored codes); then the compile time of one forward per rank, TP=2 (two
gloo ranks, each compiling its own graph with its all-reduces) as a ratio to TP=1 in the same run."""

import argparse
import datetime
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from checkpoint_memory import measure_in_fresh_process
from qwen3_shapes import qwen3_06b_shaped
from transformers import Qwen3ForCausalLM

import mxfx
from mxfx import checkpoint
from mxfx.parallel import tensor_parallel


def _load(folder, rank, size):
    return checkpoint.load(folder, tp_rank=rank, tp_size=size)


def _compile_seconds(folder: Path, rank: int, size: int, store: str) -> float:
    """Seconds to compile and run one forward of this rank's model (TP=1: the whole model)."""
    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, size), rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=600))
    model = checkpoint.load(folder, tp_rank=rank, tp_size=size)
    scheme = tensor_parallel(model).scheme if size > 1 else None
    ids = torch.zeros(1, 16, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend=mxfx.backend(scheme, target="reference", progress=False), fullgraph=True)(ids)
    seconds = time.perf_counter() - start
    if size > 1:
        dist.destroy_process_group()
    return seconds


def _rank(queue, folder, rank, size, store):
    queue.put((rank, _compile_seconds(folder, rank, size, store)))


def compile_seconds(folder: Path, size: int, store: str) -> list[float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_rank, args=(queue, folder, r, size, store)) for r in range(size)]
    for process in ranks:
        process.start()
    seconds = dict(queue.get() for _ in ranks)
    for process in ranks:
        process.join()
    return [seconds[r] for r in range(size)]


def _floor(model_bytes: int, stored: dict) -> int:
    return model_bytes + sum(t.numel() * t.element_size() for s in stored.values() for t in s.tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--scheme", default="mxfp4_dual", choices=sorted(checkpoint.WRITTEN_TYPES))
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        bf16, out = Path(tmp) / "bf16", Path(tmp) / "quantized"
        Qwen3ForCausalLM(qwen3_06b_shaped(args.layers)).to(torch.bfloat16).save_pretrained(bf16)
        checkpoint.quantize(bf16, args.scheme, out)
        print(f"{args.layers}-layer Qwen3-0.6B-shaped model, {args.scheme} checkpoint "
              f"{sum(f.stat().st_size for f in out.glob('*.safetensors')) / mib:.0f} MiB")
        for rank, size in ((0, 1), (0, 2), (1, 2)):
            peak = measure_in_fresh_process(_load, out, rank, size)["private"]
            model = _load(out, rank, size)  # here only for its sizes
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            floor = _floor(model_bytes, checkpoint.stored_weights(model))
            del model
            print(f"load TP={size} rank {rank}: peak private {peak / mib:5.0f} MiB, floor (its bf16 model + stored "
                  f"codes) {floor / mib:5.0f} MiB, peak / floor {peak / floor:.2f}")
        whole = compile_seconds(out, 1, str(Path(tmp) / "store1"))[0]
        ranks = compile_seconds(out, 2, str(Path(tmp) / "store2"))
        print(f"compile + first forward: TP=1 {whole:.1f} s; TP=2 per rank "
              f"{', '.join(f'{s:.1f} s' for s in ranks)} (ratio to TP=1 {max(ranks) / whole:.2f}; the two ranks "
              "share this machine's cores)")


if __name__ == "__main__":
    main()

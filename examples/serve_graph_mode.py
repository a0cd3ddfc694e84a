"""The pattern a graph-mode server uses, with mxfx: a static KV cache, a few fixed batch-size buckets
compiled once each (the way torchair gears work), greedy decoding of a batch of prompts, and no
recompiles after warm-up (asserted). Prints time to first token and decode tokens/s for bf16 and each
scheme. Here it runs on the CPU reference target; on an Ascend 950 pass --target npu --inner torchair.

    python examples/serve_graph_mode.py [--model DIR] [--buckets 1 2 4] [--new-tokens 32]
    torchrun --nproc-per-node 2 examples/serve_graph_mode.py --tp 2   # tensor-parallel, gloo on the CPU

With --tp N every rank holds its shards (mxfx.parallel.tensor_parallel; a quantized checkpoint is read
per rank, mxfx.checkpoint.load(tp_rank=, tp_size=)), compiles its own graphs with the all-reduces in
them, and decodes the same tokens; rank 0 prints.
"""

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from transformers import StaticCache

import mxfx
from mxfx import checkpoint, evaluation, parallel, textdata
from mxfx.cli import HelpFormatter, at_least
from mxfx.schemes import SCHEMES


class Server:
    """One model, one backend, a static cache and a compiled step per batch-size bucket."""

    def __init__(self, model, backend, buckets: list[int], prompt_len: int, new_tokens: int):
        self.model, self.prompt_len, self.new_tokens = model, prompt_len, new_tokens
        self.max_len = prompt_len + new_tokens
        self.step = torch.compile(model.forward, backend=backend, dynamic=False) if backend else model.forward
        self.caches = {b: StaticCache(config=model.config, max_cache_len=self.max_len) for b in buckets}

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """Greedy tokens [B, new_tokens] for equal-length prompts [B, P]; time to first token and decode
        seconds. B must be a bucket (pad the batch up to one in a real server)."""
        cache = self.caches[prompts.shape[0]]
        cache.reset()
        start = time.perf_counter()
        position = torch.arange(self.prompt_len)
        logits = self.step(prompts, cache=cache, cache_position=position, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        first = time.perf_counter() - start
        generated = [token]
        for i in range(self.new_tokens - 1):
            position = torch.tensor([self.prompt_len + i])
            logits = self.step(token, cache=cache, cache_position=position, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            generated.append(token)
        return torch.cat(generated, dim=1), first, time.perf_counter() - start - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=str(evaluation.SHIPPED_MODEL), help="a local Qwen3 folder")
    parser.add_argument("--buckets", type=at_least(1), nargs="+", default=[1, 2, 4], help="batch sizes, one graph each")
    parser.add_argument("--prompt-len", type=at_least(1), default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=at_least(2), default=32, help="tokens generated per prompt")
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES), help="after bf16")
    parser.add_argument("--target", choices=["reference", "npu", "auto"], default="reference", help="mxfx target")
    parser.add_argument("--inner", choices=["eager", "inductor", "torchair"], default="eager",
                        help="the backend that runs the rewritten graphs")
    parser.add_argument("--tp", type=at_least(1), default=1,
                        help="tensor-parallel ranks (launch with torchrun --nproc-per-node N)")
    args = parser.parse_args()
    if args.tp > 1 and int(os.environ.get("WORLD_SIZE", 1)) != args.tp:
        parser.error(f"--tp {args.tp}: launch with torchrun --nproc-per-node {args.tp} (WORLD_SIZE is "
                     f"{os.environ.get('WORLD_SIZE', 'unset')})")
    # One graph per bucket and phase (prefill, decode), each traced twice (the static cache allocates
    # itself on first use): more than Dynamo's default limit of 8, after which it would silently run
    # the model eagerly, unquantized. Raise the limit, and fail instead of falling back.
    torch._dynamo.config.recompile_limit = 4 * len(args.buckets) + 4
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    texts = textdata.texts(textdata.split()[1])
    if max(args.buckets) > len(texts) or args.prompt_len > min(len(textdata.encode(t)) for t in texts):
        parser.error(f"the held-out topics give at most {len(texts)} prompts of "
                     f"{min(len(textdata.encode(t)) for t in texts)} tokens")
    rank = 0
    if args.tp > 1:
        dist.init_process_group("hccl" if args.target == "npu" else "gloo")
        rank = dist.get_rank()
    try:
        if args.tp > 1 and (Path(args.model) / checkpoint.DESCRIPTION).is_file():
            model = checkpoint.load(args.model, tp_rank=rank, tp_size=args.tp)  # only this rank's bytes
        else:
            model = evaluation.load_model(args.model)
        if args.tp > 1:
            report = parallel.tensor_parallel(model)
    except ValueError as error:  # ModelError, CheckpointError, ParallelError: says which folder or linear and why
        parser.error(str(error))
    say = print if rank == 0 else (lambda *a, **k: None)
    prompts_all = torch.stack(
        [torch.tensor(textdata.encode(text)[: args.prompt_len]) for text in texts[: max(args.buckets)]]
    )

    say(f"buckets {args.buckets}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"target {args.target}" + (f", TP={args.tp}" if args.tp > 1 else ""))
    if args.tp > 1:
        moved = [p for p in report.linears if p.decision == "fallback"]
        say(f"{len(moved)} row-parallel linears run mxfp4 where mxfp4_dual's 512 rule breaks at TP={args.tp} "
            "(mxfx inspect --tp prints the table)")
    say(f"{'model':12s} {'batch':>5s} {'TTFT ms':>9s} {'decode tok/s':>13s}  first prompt's continuation")
    for name in ["bf16", *args.schemes]:
        torch._dynamo.reset()
        scheme = parallel.parallel_scheme(model, name) if args.tp > 1 and name != "bf16" else name
        be = None if name == "bf16" else mxfx.backend(scheme, target=args.target, inner=args.inner)
        server = Server(model, be, args.buckets, args.prompt_len, args.new_tokens)
        for bucket in args.buckets:  # warm-up: each bucket's prefill and decode graphs (the first call
            for _ in range(2):        # also allocates the static cache, which changes what Dynamo guards)
                server.generate(prompts_all[:bucket])
        graphs = counters["stats"]["unique_graphs"]
        for bucket in args.buckets:
            tokens, first, decode = server.generate(prompts_all[:bucket])
            rate = bucket * (args.new_tokens - 1) / decode
            text = textdata.decode(tokens[0].tolist()).replace("\n", " ")[:40]
            say(f"{name:12s} {bucket:5d} {first * 1e3:9.1f} {rate:13.1f}  {text!r}")
        assert counters["stats"]["unique_graphs"] == graphs, f"{name}: recompiled after warm-up"
    say("no recompiles after warm-up")
    if args.tp > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

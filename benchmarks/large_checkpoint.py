"""`mxfx quantize` and `mxfx eval` of a Qwen3-8B-shaped checkpoint (random weights: 36 layers, hidden 4096,
intermediate 12288, 32 heads, 8 KV heads, vocab 151,936) on this machine: peak memory and time of each.

The bf16 source folder (16 GB) is written shard by shard (one decoder layer at a time), quantized by
`mxfx quantize` (streamed, tensor by tensor) and deleted before the evaluation; the quantized folder is
deleted at the end (--keep keeps it). Each command runs in its own process, sampled from
/proc/PID/statm: "rss" counts every resident page, "private" leaves out file-backed ones (the
memory-mapped safetensors files, page cache the kernel can drop). `mxfx eval` loads the quantized linears
as their codes only and streams its bf16 baseline (each linear dequantized for its call). The byte-level
tokenizer written into the folder is a stand-in (the weights are random: the perplexities mean nothing).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3Config

from mxfx.checkpoint.read import skeleton

PAGE = os.sysconf("SC_PAGE_SIZE")


def config(layers: int, hidden: int, intermediate: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6)


def byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with no merges (256 tokens and an end of text), in Hugging Face's files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)


def write_source(folder: Path, cfg: Qwen3Config, seed: int = 0) -> int:
    """The bf16 folder, one safetensors shard per decoder layer (plus one for the embeddings and head): random
    normal weights (std 0.02), norms at 1. Returns its bytes."""
    folder.mkdir(parents=True)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(folder)
    byte_tokenizer(folder)
    generator, shards, total = torch.Generator().manual_seed(seed), {}, 0
    for name, parameter in skeleton(cfg).named_parameters():
        key = name.split(".")[2] if name.startswith("model.layers.") else "other"
        shards.setdefault(key, []).append((name, tuple(parameter.shape)))
    weight_map = {}
    for key, names in shards.items():
        tensors = {}
        for name, shape in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        file = f"model-{key}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def run(command: list[str]) -> dict:
    """Run an mxfx command in a new process; its wall time, peak rss / private bytes and output."""
    start, peak, peak_private = time.perf_counter(), 0, 0
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-c", "import sys; from mxfx import cli; sys.exit(cli.main())",
                                    *command], stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            try:
                statm = Path(f"/proc/{process.pid}/statm").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                break
            resident, shared = int(statm[1]) * PAGE, int(statm[2]) * PAGE
            peak, peak_private = max(peak, resident), max(peak_private, resident - shared)
            time.sleep(0.01)
        process.wait()
        log.seek(0)
        output = log.read()
    if process.returncode:
        raise SystemExit(f"mxfx {' '.join(command)} failed ({process.returncode}):\n{output[-4000:]}")
    return {"s": time.perf_counter() - start, "rss": peak, "private": peak_private, "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=12288)
    parser.add_argument("--scheme", default="mxfp4_dual")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the two folders are written")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the quantized folder")
    args = parser.parse_args()
    cfg = config(args.layers, args.hidden, args.intermediate)
    work = Path(tempfile.mkdtemp(prefix="mxfx-large-", dir=args.dir))
    source, out = work / "bf16", work / "quantized"
    try:
        start = time.perf_counter()
        bf16_bytes = write_source(source, cfg)
        print(f"bf16 source: {bf16_bytes / 2**30:.2f} GiB written in {time.perf_counter() - start:.0f} s")
        quantize = run(["quantize", "--model", str(source), "--scheme", args.scheme, "--out", str(out)])
        shutil.rmtree(source)
        stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(f"mxfx quantize: {quantize['s']:.0f} s, peak rss {quantize['rss'] / 2**30:.2f} GiB, private "
              f"{quantize['private'] / 2**30:.2f} GiB; checkpoint {stored / 2**30:.2f} GiB")
        evaluate = run(["eval", "--model", str(out), "--max-tokens", str(args.max_tokens), "--seq", str(args.seq),
                        "--batch-size", str(args.batch_size), "--new-tokens", "0"])
        rows = dict(re.findall(r"^(bf16|modelslim\S*)\s.*?(\d+\.\d)\s*$", evaluate["output"], re.M))
        tokens = int(re.search(r"held-out text: ([\d,]+) tokens", evaluate["output"]).group(1).replace(",", ""))
        compile_s = re.search(r"^modelslim\S*\s.*\s(\d+\.\d)\s+\d+\.\d\s*$", evaluate["output"], re.M).group(1)
        print(f"mxfx eval: {evaluate['s']:.0f} s in all, peak rss {evaluate['rss'] / 2**30:.2f} GiB, private "
              f"{evaluate['private'] / 2**30:.2f} GiB (bf16 weights would be {bf16_bytes / 2**30:.2f} GiB)")
        for name, seconds in rows.items():
            print(f"  {name}: {float(seconds) / tokens * 1000:.1f} s per 1,000 tokens ({tokens} tokens)"
                  + (" (bf16 streamed: dequantized per linear)" if name == "bf16" else f", compile {compile_s} s"))
        print(evaluate["output"][-3000:] if os.environ.get("VERBOSE") else "")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

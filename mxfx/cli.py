"""The `mxfx` command line: demo, eval, inspect (and formats, a numerics report on a random tensor)."""

import argparse
import sys
import time
from pathlib import Path

import torch

from . import evaluation
from .formats import dequantize_dual_level, dequantize_mx, quantize_dual_level, quantize_mx
from .metrics import nbytes, sqnr_db


def _formats_report(x: torch.Tensor) -> str:
    rows = []
    quantizers = {
        "mxfp8 (E4M3, E8M0/32)": lambda: quantize_mx(x, "fp8_e4m3"),
        "mxfp4 (E2M1, E8M0/32)": lambda: quantize_mx(x, "fp4_e2m1"),
        "dual-level (E2M1, E8M0/32, FP32/512)": lambda: quantize_dual_level(x),
    }
    dequantizers = [
        lambda q: dequantize_mx(*q, "fp8_e4m3"),
        lambda q: dequantize_mx(*q, "fp4_e2m1"),
        lambda q: dequantize_dual_level(*q),
    ]
    for (name, quantize), dequantize in zip(quantizers.items(), dequantizers):
        start = time.perf_counter()
        quantized = quantize()
        elapsed = time.perf_counter() - start
        y = dequantize(quantized)
        scale_bytes = quantized[-1].view(torch.uint8)
        rows.append(
            (
                name,
                f"{nbytes(quantized) / 2**20:.2f} MiB",
                f"{8 * nbytes(quantized) / x.numel():.4f}",
                f"{sqnr_db(x, y):.2f}",
                f"{(x.float() - y).abs().max().item():.4g}",
                f"{int(scale_bytes.min())}..{int(scale_bytes.max())}",
                f"{elapsed * 1e3:.1f}",
            )
        )
    header = ("format", "size", "bits/elem", "SQNR dB", "max |err|", "E8M0 bytes", "ms")
    return (f"input: {x.dtype} {list(x.shape)}, {nbytes([x]) / 2**20:.2f} MiB (16 bits/elem), randn seed 0\n"
            + _table(header, rows))


def _table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def _print_evaluation(result: "evaluation.Evaluation", tokens: evaluation.Tokenizer, prompt: str, plot: str | None) -> None:
    first = result.results[0].report if result.results else None
    if first is not None:
        print(first, end="\n\n")
    rows = [("bf16", f"{first.bytes_before / 2**20:.2f}" if first else "", "16", f"{result.bf16_perplexity:.3f}", "",
             "100.0%", "", "", f"{result.bf16_run_s:.1f}")]
    for r in result.results:
        sqnr = list(r.layer_sqnr.values())
        bits = f"{16 * r.report.bytes_after / r.report.bytes_before:.4f}" if r.report.bytes_before else "nothing rewritten"
        rows.append((r.scheme, f"{r.report.bytes_after / 2**20:.2f}", bits,
                     f"{r.perplexity:.3f}", f"{100 * (r.perplexity / result.bf16_perplexity - 1):+.1f}%",
                     f"{100 * r.top1_agreement:.1f}%", f"{min(sqnr):.1f} / {sum(sqnr) / len(sqnr):.1f}" if sqnr else "",
                     f"{r.compile_s:.1f}", f"{r.run_s:.1f}"))
    print(f"held-out text: {result.tokens:,} tokens")
    print(_table(("model", "linear MiB", "bits/weight", "perplexity", "vs bf16", "top-1 = bf16",
                  "layer SQNR min/mean dB", "compile s", "eval s"), rows))
    names = list(result.results[0].layer_sqnr) if result.results else []
    if names:
        print("\nper-layer output SQNR (dB), quantized layer vs bf16 layer on the same input")
        print(_table(("linear", *(r.scheme for r in result.results)),
                     [(name, *(f"{r.layer_sqnr.get(name, float('nan')):.1f}" for r in result.results)) for name in names]))
    if prompt:
        print(f"\ngreedy continuations of {prompt!r}")
        for name, ids in [("bf16", result.bf16_continuation)] + [(r.scheme, r.continuation) for r in result.results]:
            print(f"  {name:11s} {tokens.decode(ids)!r}")
    if plot:
        _plot(result, plot)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"mxfx: --plot needs matplotlib (pip install 'mxfx[plot]'): {error}")
    return plt


def _plot(result: "evaluation.Evaluation", path: str) -> None:
    plt = _pyplot()
    names = list(result.results[0].layer_sqnr)
    figure, axes = plt.subplots(figsize=(max(6, len(names) * 0.3), 4))
    for r in result.results:
        axes.plot(range(len(names)), [r.layer_sqnr[n] for n in names], marker="o", label=r.scheme)
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes.set_ylabel("output SQNR vs bf16 (dB)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def _load(args):
    """The model folder; a quantized checkpoint is compiled with its own scheme, whatever --scheme says."""
    from .checkpoint import stored_weights

    model = evaluation.load_model(args.model)
    if stored_weights(model):
        args.scheme = ["modelslim"]
    return model


def _evaluate_folder(args, default_prompt: str | None) -> int:
    from . import textdata

    if getattr(args, "plot", None):
        _pyplot()  # before the long part: fail fast without matplotlib
    path = Path(args.model)
    model = _load(args)
    tokens = evaluation.Tokenizer(path, model)
    documents = [Path(args.text).read_text()] if args.text else textdata.texts(textdata.split()[1])
    stream = textdata.stream(documents, tokens.encode, tokens.end)
    prompt = args.prompt if args.prompt is not None else default_prompt
    result = evaluation.evaluate(model, stream, args.scheme, seq=args.seq, max_tokens=args.max_tokens,
                                 prompt=tokens.encode(prompt) if prompt else None, end=tokens.end,
                                 new_tokens=args.new_tokens)
    if args.scheme == ["modelslim"]:
        print("a quantized checkpoint: its \"bf16\" is the stored weights dequantized to bf16 (the original "
              "weights are not in it), so the comparison isolates the quantized matmuls and activations\n")
    _print_evaluation(result, tokens, prompt, getattr(args, "plot", None))
    return 0


class _Captured(Exception):
    """Raised by inspect's backend once the graph is rewritten, so that it is never run."""


def _inspect(args) -> int:
    from .dynamo_backend import backend

    model = _load(args)
    for scheme in args.scheme:
        be = backend(scheme, target="reference")

        def rewrite_only(gm, example_inputs):
            be.rewrite(gm, example_inputs)
            raise _Captured

        torch._dynamo.reset()
        try:
            with torch.no_grad():
                torch.compile(model, backend=rewrite_only, fullgraph=True)(torch.zeros(1, 8, dtype=torch.long))
        except Exception:  # Dynamo wraps the backend's exception
            if not be.reports:
                raise
        print(be.reports[-1], end="\n\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .schemes import SCHEMES

    parser = argparse.ArgumentParser(prog="mxfx", description="MXFP-quantized linears through torch.compile")
    commands = parser.add_subparsers(dest="command", required=True)
    formats = commands.add_parser("formats", help="quantize a random bf16 tensor with each MX format and report")
    formats.add_argument("--rows", type=int, default=1024)
    formats.add_argument("--cols", type=int, default=4096, help="the quantized (last) axis")

    def model_args(command, default_model=None):
        command.add_argument("--model", default=default_model, required=default_model is None,
                             help="a local Hugging Face Qwen3 folder")
        command.add_argument("--scheme", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))

    demo = commands.add_parser("demo", help="the shipped tiny Qwen3 on held-out reference-manual text, every scheme")
    evaluate = commands.add_parser("eval", help="the same measurements on any local Qwen3 folder")
    for command, default in ((demo, str(evaluation.SHIPPED_MODEL)), (evaluate, None)):
        model_args(command, default)
        command.add_argument("--text", help="evaluation text file (default: the held-out reference-manual topics)")
        command.add_argument("--seq", type=int, default=256)
        command.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
        command.add_argument("--prompt", default=None)
        command.add_argument("--new-tokens", type=int, default=40)
    evaluate.add_argument("--plot", help="write a PNG of per-layer SQNR per scheme (needs matplotlib)")
    inspect = commands.add_parser("inspect", help="the rewrite table of a model folder, without running it")
    model_args(inspect)
    quantize = commands.add_parser("quantize", help="write a quantized checkpoint (msmodelslim layout) of a model folder")
    quantize.add_argument("--model", required=True, help="a local Hugging Face folder with bf16 weights")
    quantize.add_argument("--scheme", required=True, choices=list(SCHEMES))
    quantize.add_argument("--out", required=True, help="the new checkpoint folder (must not exist)")
    args = parser.parse_args(argv)
    try:
        if args.command == "formats":
            x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).bfloat16()
            print(_formats_report(x))
        elif args.command == "demo":
            return _evaluate_folder(args, "The with statement")
        elif args.command == "eval":
            return _evaluate_folder(args, None)
        elif args.command == "quantize":
            from .checkpoint import quantize as write_checkpoint

            print(f"wrote {write_checkpoint(args.model, args.scheme, args.out)}")
        else:
            return _inspect(args)
    except (ValueError, OSError) as error:
        print(f"mxfx {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0

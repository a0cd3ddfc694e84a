"""The `mxfx` command line: demo, eval, inspect, quantize, calibrate, and formats (a numerics report on a random
tensor)."""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from passes import FusionReport
from passes.report import table

from . import evaluation
from .dynamo_backend import DEFAULT_SCHEME
from .formats import dequantize_dual_level, dequantize_mx, quantize_dual_level, quantize_mx
from .metrics import nbytes, sqnr_db
from .mixed_precision import RECOVERED_CANDIDATES, WRITABLE_CANDIDATES, Plan
from .schemes import SCHEMES

MIXED = {"auto", "first-blocks"}  # --scheme values that are plans over a mixed-precision measurement


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
            + table(header, rows))


def _print_evaluation(result: "evaluation.Evaluation", runs: list, tokens: evaluation.Tokenizer, prompt: str,
                      plot: str | None, model: str) -> None:
    first = result.results[0].report if result.results else None
    if first is not None:
        print(first, end="\n\n")
    rows = [("bf16", f"{first.weight_bytes[0] / 2**20:.2f}" if first else "", "16", f"{result.bf16_perplexity:.3f}", "",
             "100.0%", "", "", f"{result.bf16_run_s:.1f}")]
    for r in result.results:
        sqnr = list(r.layer_sqnr.values())
        bits = f"{r.report.weight_bits:.4f}" if r.report.weight_bits is not None else "nothing rewritten"
        rows.append((r.scheme, f"{r.report.weight_bytes[1] / 2**20:.2f}", bits,
                     f"{r.perplexity:.3f}", f"{100 * (r.perplexity / result.bf16_perplexity - 1):+.1f}%",
                     f"{100 * r.top1_agreement:.1f}%", f"{min(sqnr):.1f} / {sum(sqnr) / len(sqnr):.1f}" if sqnr else "",
                     f"{r.compile_s:.1f}", f"{r.run_s:.1f}"))
    print(f"held-out text: {result.tokens:,} tokens")
    print(table(("model", "linear MiB", "bits/weight", "perplexity", "vs bf16", "top-1 = bf16",
                  "layer SQNR min/mean dB", "compile s", "eval s"), rows))
    names = _sqnr_linears(result)
    if names:
        print("\nper-layer output SQNR (dB), quantized layer vs bf16 layer on the same input")
        print(table(("linear", *(r.scheme for r in result.results)),
                     [(name, *(f"{r.layer_sqnr.get(name, float('nan')):.1f}" for r in result.results))
                      for name in names]))
    if prompt:
        print(f"\ngreedy continuations of {prompt!r}")
        for name, ids in [("bf16", result.bf16_continuation)] + [(r.scheme, r.continuation) for r in result.results]:
            print(f"  {name:11s} {tokens.decode(ids)!r}")
    if plot:
        _plot(result, plot, model)
        if len({r.report.weight_bits for r in result.results}) > 1:
            _plot_bits(result, runs, plot, model)


def _sqnr_linears(result: "evaluation.Evaluation") -> list[str]:
    """The linears any run measured a layer SQNR for, in order (a plan's bf16 ones have none)."""
    return list(dict.fromkeys(name for r in result.results for name in r.layer_sqnr))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"mxfx: --plot needs matplotlib (pip install 'mxfx[plot]'): {error}") from error
    return plt


def _plot(result: "evaluation.Evaluation", path: str, model: str) -> None:
    """Per-layer SQNR per scheme, one panel per block: `model.layers.3.mlp.down_proj` is drawn as
    `mlp.down_proj` in block 3's panel, so the labels stay readable for any depth."""
    plt = _pyplot()
    names = _sqnr_linears(result)
    groups: dict[str, list[str]] = {}
    for name in names:
        block = name.partition(".layers.")[2].partition(".")[0]
        groups.setdefault(f"block {block}" if block else "other", []).append(name)
    figure, axes = plt.subplots(1, len(groups), sharey=True, squeeze=False,
                                figsize=(max(6, 0.35 * len(names) + 1.5), 4.5), layout="constrained")
    for axis, (group, members) in zip(axes[0], groups.items()):
        for r in result.results:
            axis.plot(range(len(members)), [r.layer_sqnr.get(n, math.nan) for n in members], marker="o",
                      label=r.scheme)
        axis.set_xticks(range(len(members)), [n.partition(".layers.")[2].partition(".")[2] or n for n in members],
                        rotation=60, ha="right", fontsize=8)
        axis.set_title(group, fontsize=9)
        axis.grid(True, alpha=0.4)
    axes[0][0].set_ylabel("output SQNR vs bf16 (dB)")
    figure.supxlabel("linear layer")
    figure.suptitle(f"{Path(model).name}: per-layer output SQNR (quantized layer vs bf16, same input)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", title="scheme")
    figure.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def _plot_bits(result: "evaluation.Evaluation", runs: list, path: str, model: str) -> None:
    """Perplexity gap and next-token agreement against the average weight bits, one curve per series of
    plans (auto over its budgets, the first-N-blocks heuristic over N), a point per uniform scheme; written
    beside the per-layer figure (PATH-bits.png)."""
    plt = _pyplot()
    series: dict[str, list] = {}
    for run, r in zip(runs, result.results):
        series.setdefault(run.series if isinstance(run, Plan) else r.scheme, []).append(r)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for name, members in series.items():
        members.sort(key=lambda r: r.report.weight_bits)
        bits = [r.report.weight_bits for r in members]
        style = {"marker": "o", "linestyle": "-" if len(members) > 1 else "none"}
        axes[0].plot(bits, [100 * (r.perplexity / result.bf16_perplexity - 1) for r in members], label=name, **style)
        axes[1].plot(bits, [100 * r.top1_agreement for r in members], label=name, **style)
    for axis, ylabel in zip(axes, ("perplexity vs bf16 (%)", "next token = bf16 (%)")):
        axis.set_xlabel("average bits per weight element (codes and scales)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.4)
    axes[0].axhline(0, color="black", linewidth=0.8)
    figure.suptitle(f"{Path(model).name}: accuracy against weight bits ({result.tokens:,} held-out tokens)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper")
    out = Path(path)
    out = out.with_name(f"{out.stem}-bits{out.suffix or '.png'}")
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


def _load(args):
    """The model folder. A quantized checkpoint runs with its own stored scheme, so an explicit --scheme
    is refused there rather than silently replaced; without --scheme, every scheme (or the stored one). Its
    quantized linears hold their codes only (no bf16 copy: a checkpoint larger than its bf16 model fits)."""
    from .checkpoint import stored_weights

    model = evaluation.load_model(args.model, bf16_weights=False)
    stored = "modelslim" if stored_weights(model) else None
    if stored is not None and args.scheme is not None:
        raise ValueError(f"--model {args.model} is a quantized checkpoint, which runs with its stored scheme "
                         f"({stored}); drop --scheme {' '.join(args.scheme)}")
    if stored is not None:
        args.scheme = [stored]
    elif args.scheme is None:
        args.scheme = list(SCHEMES)
    if MIXED & set(args.scheme):
        plans = _mixed_plans(args, model, evaluation.Tokenizer(Path(args.model), model), set(args.scheme))
        args.scheme = [run for scheme in args.scheme for run in plans.get(scheme, [scheme])]
    elif args.bits is not None:
        raise ValueError("--bits is for --scheme auto")
    return model


def _mixed_plans(args, model, tokens, wanted: set[str], share: str = "activation") -> dict[str, list]:
    """--scheme auto: a plan per --bits, each printed (each linear's choice, sensitivity and bytes);
    --scheme first-blocks: the heuristic auto is compared with, the first N decoder blocks bf16 and the
    rest the smallest candidate, for each N. The sensitivities are measured on the first
    --sensitivity-tokens of the calibration windows, cached beside a --calibration file
    (FILE.sensitivity.json); --tp N keeps only the candidates whose K rules hold at that TP size."""
    from . import mixed_precision, parallel

    if "auto" in wanted and not args.bits:
        raise ValueError("--scheme auto needs --bits (the average bits per weight element, e.g. 4.5)")
    needs_gram = any("gptq" in candidate for candidate in args.candidates)
    calibration = _calibration(args, model, tokens, gram=needs_gram) if needs_gram else None
    batches = _calibration_windows(args, tokens)[: max(1, args.sensitivity_tokens // args.seq)]
    cache = None if args.calibration is None else Path(args.calibration + ".sensitivity.json")
    sensitivity = mixed_precision.measured(cache, model, batches.split(args.batch_size), calibration, args.candidates)
    if getattr(args, "tp", 1) > 1:
        sensitivity, dropped = parallel.constrain(sensitivity, model, args.tp)
        for fqn, label, why in dropped:
            print(f"TP={args.tp}: {fqn} cannot run {label} ({why})")
    plans = {}
    if "auto" in wanted:
        plans["auto"] = [mixed_precision.solve(sensitivity, bits, share) for bits in args.bits]
        for plan in plans["auto"]:
            print(plan, end="\n\n")
    if "first-blocks" in wanted:
        if mixed_precision.blocks(sensitivity) < 2:
            raise ValueError("--scheme first-blocks needs a model with at least 2 decoder blocks")
        rest = mixed_precision.smallest(sensitivity)
        plans["first-blocks"] = [mixed_precision.first_blocks(sensitivity, n, rest)
                                 for n in range(1, mixed_precision.blocks(sensitivity))]
        print(f"first-blocks: {', '.join(plan.label for plan in plans['first-blocks'])}, the rest {rest}\n")
    return plans


def _check_positions(args, model, prompt_tokens: int) -> None:
    """Refuse windows or continuations longer than the model's positions: RoPE runs past them, but
    the perplexity or text it gives there means nothing."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return
    where = f"the model's max_position_embeddings ({positions}, {Path(args.model) / 'config.json'})"
    if args.seq > positions:
        raise ValueError(f"--seq {args.seq} is past {where}; use --seq {positions} or less")
    if prompt_tokens + args.new_tokens > positions:
        raise ValueError(f"the prompt ({prompt_tokens} tokens) plus --new-tokens {args.new_tokens} is past {where}; "
                         f"use --new-tokens {max(0, positions - prompt_tokens)} or less")


def _read_text(path: str, option: str = "--text") -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{option} {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error


def _calibration_windows(args, tokens: evaluation.Tokenizer) -> torch.Tensor:
    """[n, --seq] windows of --calibration-text (default: the shipped text's training topics, never the
    held-out ones the evaluation reads), at most --calibration-tokens, picked across the whole text."""
    from . import textdata

    if args.calibration_text:
        source, documents = args.calibration_text, [_read_text(args.calibration_text, "--calibration-text")]
    else:
        source, documents = "the training topics", textdata.texts(textdata.split()[0])
    stream = textdata.stream(documents, tokens.encode, tokens.end)
    if min(len(stream) - 1, args.calibration_tokens) < args.seq:
        raise ValueError(f"calibration: {source} has {len(stream)} tokens and --calibration-tokens is "
                         f"{args.calibration_tokens}: less than one window (--seq {args.seq})")
    windows = evaluation.windows(stream, args.seq)[:, :-1]
    chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    return windows[chosen[: args.calibration_tokens // args.seq]]


def _calibration(args, model, tokens: evaluation.Tokenizer, gram: bool = True):
    """--calibration FILE when it exists (checked against the model), else the model calibrated on
    _calibration_windows (and written to FILE when one is named)."""
    from .calibrating import calibrate
    from .calibration import Calibration

    path = getattr(args, "calibration", None)
    if path is not None and Path(path).is_file():
        calibration = Calibration.load(path)
        calibration.check(model)
        return calibration
    batches = _calibration_windows(args, tokens)
    start = time.perf_counter()
    calibration = calibrate(model, batches.split(args.batch_size), gram=gram)
    source = args.calibration_text or "the training topics"
    print(f"calibrated on {batches.numel():,} tokens of {source} in {time.perf_counter() - start:.1f} s")
    if path is not None:
        calibration.save(path)
        print(f"wrote {path}")
    return calibration


def _runs(args, model, tokens: evaluation.Tokenizer) -> list:
    """Each --scheme plain ("none") and with each other --recipe, in that order, each recipe once (a
    SCHEME+RECIPE entry: that recipe only); a scheme the recipes do not serve, or without a recommended
    recipe, runs plain only, and says so."""
    from . import recipes

    asked = getattr(args, "recipe", None) or ["none"]
    wanted = [(s.partition("+")[0], [s.partition("+")[2]]) if isinstance(s, str) and "+" in s else (s, asked)
              for s in args.scheme]  # SCHEME+RECIPE: that recipe only
    if all(names == ["none"] for _, names in wanted):
        return [scheme for scheme, _ in wanted]
    if args.scheme == ["modelslim"]:
        raise ValueError(f"--model {args.model} is a quantized checkpoint: its codes are fixed, so --recipe "
                         f"{' '.join(asked)} cannot apply (recipes run when quantizing a bf16 model)")
    chosen = {}  # scheme -> recipe names, in order, "none" for plain rounding
    for scheme, recipe_names in wanted:
        names, label = chosen.setdefault(scheme, []), getattr(scheme, "label", scheme)
        for recipe in recipe_names:
            name = recipe
            if recipe != "none" and not (isinstance(scheme, str) and recipes.serves(scheme)):
                print(f"{label}: recipes serve mxfp4_dual, mxfp4_w4a8 and mxfp8 only; it runs plain for --recipe "
                      f"{recipe}")
                name = "none"
            elif recipe == "recommended":
                name = recipes.RECOMMENDED.get(scheme, "none")
                if name == "none":
                    print(f"{scheme}: no recipe is recommended for it yet (none measured); it runs plain")
            names += [] if name in names else [name]
    needs = any(name != "none" and recipes.RECIPES[name].needs_calibration for names in chosen.values()
                for name in names)
    calibration = _calibration(args, model, tokens) if needs else None
    return [scheme if name == "none" else recipes.apply(scheme, name, calibration, model)
            for scheme, names in chosen.items() for name in names]


def _first_words(text: str, characters: int = 40) -> str:
    """The eval command's default prompt: the evaluation text's opening, cut at a word boundary."""
    head = " ".join(text.split())[:characters]
    return head.rsplit(" ", 1)[0] if " " in head else head


def _evaluate_folder(args) -> int:
    from . import textdata

    if getattr(args, "plot", None):
        _pyplot()  # before the long part: fail fast without matplotlib
    if args.max_tokens is not None and args.max_tokens < args.seq:
        raise ValueError(f"--max-tokens {args.max_tokens} is less than one window (--seq {args.seq})")
    documents = [_read_text(args.text)] if args.text else textdata.texts(textdata.split()[1])
    model = _load(args)
    tokens = evaluation.Tokenizer(Path(args.model), model)
    prompt = args.prompt if args.prompt is not None else _first_words(documents[0])
    prompt_ids = tokens.encode(prompt) if prompt and args.new_tokens else None
    _check_positions(args, model, len(prompt_ids or []))
    stream = textdata.stream(documents, tokens.encode, tokens.end)
    runs = _runs(args, model, tokens)
    result = evaluation.evaluate(model, stream, runs, seq=args.seq, batch_size=args.batch_size,
                                 max_tokens=args.max_tokens, prompt=prompt_ids, end=tokens.end,
                                 new_tokens=args.new_tokens)
    if args.scheme == ["modelslim"]:
        print("a quantized checkpoint: its \"bf16\" is the stored weights dequantized to bf16 (the original "
              "weights are not in it), so the comparison isolates the quantized matmuls and activations; it is "
              "streamed, each linear dequantized for its call (the bf16 model is never held)\n")
    _print_evaluation(result, runs, tokens, prompt if prompt_ids else None, getattr(args, "plot", None), args.model)
    return 0


class _Captured(Exception):
    """Raised by inspect's backend once the graph is rewritten, so that it is never run."""


def _inspect_parallel(model, args) -> int:
    """The per-linear tensor-parallel plan of each scheme (shapes only: nothing is sharded or run)."""
    from .parallel import ParallelError, plan

    recipes = [s for s in args.scheme if isinstance(s, str) and "+" in s] + [r for r in args.recipe if r != "none"]
    if recipes:
        raise ValueError(f"--tp shows how plain schemes and mixed plans split; recipes ({', '.join(recipes)}) are not "
                         "tensor-parallelized here (their smoothing and rotation constants come from whole weights)")
    for scheme in args.scheme:
        try:
            print(plan(model, args.tp, scheme)[0], end="\n\n")
        except ParallelError as error:
            if "no scheme serves" not in str(error):
                raise
            print(f"{scheme} at TP={args.tp}: refused: {error}", end="\n\n")
    return 0


def _inspect(args) -> int:
    from .dynamo_backend import backend

    model = _load(args)
    if args.tp > 1:
        return _inspect_parallel(model, args)
    tokens = evaluation.Tokenizer(Path(args.model), model)
    for scheme in _runs(args, model, tokens):
        be = backend(scheme, target="reference")

        def rewrite_only(gm, example_inputs, be=be):
            be.rewrite(gm, example_inputs)
            raise _Captured

        torch._dynamo.reset()
        try:
            with torch.no_grad():
                torch.compile(model, backend=rewrite_only, fullgraph=True)(torch.zeros(1, 8, dtype=torch.long))
        except Exception as error:  # Dynamo wraps what the backend raised (BackendCompilerFailed.inner_exception)
            raised = getattr(error, "inner_exception", None) or error.__cause__ or error
            if not isinstance(raised, _Captured):
                raise raised from error
        print(be.reports[-1], end="\n\n")
        for fusion in be.pipeline_reports[-1].get(FusionReport):  # what the fusion passes did, per site
            print(fusion, end="\n\n")
    return 0


def _quantize(args) -> int:
    from . import recipes
    from .checkpoint import quantize

    scheme, recipe, calibration = args.scheme, None, None
    if scheme == "auto":  # one stored type per group of siblings (fused qkv / gate_up loaders need it)
        if args.recipe is not None:
            raise ValueError("--scheme auto picks recovered schemes itself: drop --recipe")
        model = evaluation.load_model(args.model)
        if len(args.bits or ()) != 1:
            raise ValueError("--scheme auto writes one checkpoint: give one --bits value")
        plans = _mixed_plans(args, model, evaluation.Tokenizer(Path(args.model), model), {"auto"}, share="type")
        scheme = plans["auto"][0].schemes()
    elif args.bits is not None or args.tp > 1:
        raise ValueError("--bits and --tp are for --scheme auto (a uniform scheme's TP split: mxfx inspect --tp N)")
    elif args.recipe is not None:  # refused before calibrating: a scheme recipes do not serve, an unknown recipe
        recipe = recipes.get_recipe(args.recipe, recipes.check_scheme(args.scheme))
        if recipe.needs_calibration or args.calibration:
            model = evaluation.load_model(args.model)
            calibration = _calibration(args, model, evaluation.Tokenizer(Path(args.model), model))
            del model
    elif args.calibration or args.calibration_text:
        raise ValueError("--calibration and --calibration-text serve --recipe or --scheme auto: give one")
    print(f"wrote {quantize(args.model, scheme, args.out, recipe=recipe, calibration=calibration)}")
    return 0


def _calibrate(args) -> int:
    if Path(args.calibration).exists():
        raise ValueError(f"--out {args.calibration} exists; choose a new file")
    model = evaluation.load_model(args.model)
    print(_calibration(args, model, evaluation.Tokenizer(Path(args.model), model)))
    return 0


def _formats(args) -> int:
    x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).bfloat16()
    print(_formats_report(x))
    return 0


def scheme_arg(text: str) -> str:
    """An argparse type: a scheme, a mixed-precision choice, or SCHEME+RECIPE (a recipe or 'recommended')."""
    from .recipes import RECIPES

    name, plus, recipe = text.partition("+")
    if name not in (*SCHEMES, *MIXED) or (plus and (name in MIXED or recipe not in (*RECIPES, "recommended"))):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a scheme: choose one of {', '.join([*SCHEMES, *sorted(MIXED)])}, or SCHEME+RECIPE with "
            f"a recipe of {', '.join([*RECIPES, 'recommended'])}")
    return text


def at_least(minimum: int):
    """An argparse type: an integer >= minimum; anything else is a usage error that says what is allowed."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (allowed: integers >= {minimum})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: it must be an integer >= {minimum}")
        return value

    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and each option's default (the examples' parsers use it too)."""


def parser() -> argparse.ArgumentParser:
    from . import __version__

    formatter = HelpFormatter
    top = argparse.ArgumentParser(prog="mxfx", description="MXFP-quantized linears through torch.compile",
                                  formatter_class=formatter)
    top.add_argument("--version", action="version", version=f"mxfx {__version__}")
    commands = top.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        sub = commands.add_parser(name, help=help, description=help, formatter_class=formatter)
        sub.set_defaults(func=func)
        return sub

    formats = command("formats", _formats, "quantize a random bf16 tensor with each MX format and report")
    formats.add_argument("--rows", type=at_least(1), default=1024, help="rows of the random tensor")
    formats.add_argument("--cols", type=at_least(1), default=4096, help="the quantized (last) axis")

    def auto_args(sub, candidates):
        sub.add_argument("--bits", type=float, nargs="+", default=None,
                         help="--scheme auto: the average bits per weight element (codes and scales; bf16 = 16), "
                              "one plan per value")
        sub.add_argument("--candidates", nargs="+", default=candidates,
                         help="--scheme auto: the schemes each linear may get besides bf16, SCHEME or SCHEME+RECIPE")
        sub.add_argument("--sensitivity-tokens", type=at_least(1), default=4096,
                         help="--scheme auto: measure each linear's sensitivity on this many calibration tokens")

    def calibration_args(sub, file=True):
        if file:
            sub.add_argument("--calibration", help="a calibration file (mxfx calibrate): read if it exists, else "
                                                   "made on --calibration-text and written there")
        sub.add_argument("--calibration-text", help="calibrate on this UTF-8 text (default: the shipped text's "
                                                    "training topics, never the held-out ones)")
        sub.add_argument("--calibration-tokens", type=at_least(1), default=16384,
                         help="calibrate on at most this many tokens, windows of --seq picked across the text")

    def model_args(sub, default_model=None):
        sub.add_argument("--model", default=default_model, required=default_model is None,
                         help="a local Hugging Face Qwen3 folder, bf16 or a quantized checkpoint")
        sub.add_argument("--scheme", nargs="+", type=scheme_arg, default=None, metavar="SCHEME[+RECIPE]",
                         help=f"schemes to compile with, of {', '.join([*SCHEMES, *sorted(MIXED)])} (default: all; a "
                              "quantized checkpoint runs its stored one; auto: mixed precision under each --bits; "
                              "first-blocks: the first N decoder blocks bf16 and the rest the smallest --candidates "
                              "scheme, each N); SCHEME+RECIPE runs that recipe only (e.g. mxfp4_dual+recommended)")
        auto_args(sub, list(RECOVERED_CANDIDATES))

    def recipe_args(sub, default):
        from .recipes import RECIPES

        sub.add_argument("--recipe", nargs="+", choices=["none", "recommended", *RECIPES], default=default,
                         help="accuracy-recovery recipes to run each scheme with ('none': plain round to nearest; "
                              "'recommended': the measured best per scheme)")
        calibration_args(sub)

    demo = command("demo", _evaluate_folder, "the shipped tiny Qwen3 on held-out reference-manual text, every scheme")
    evaluate = command("eval", _evaluate_folder, "the same measurements on any local Qwen3 folder")
    for sub, default_model, default_prompt in ((demo, str(evaluation.SHIPPED_MODEL), "The with statement"),
                                               (evaluate, None, None)):
        model_args(sub, default_model)
        sub.add_argument("--text", help="evaluation text file, UTF-8 (default: the held-out reference-manual topics)")
        sub.add_argument("--seq", type=at_least(1), default=256,
                         help="tokens per evaluation window (at most the model's max_position_embeddings)")
        sub.add_argument("--batch-size", type=at_least(1), default=8, help="windows per forward")
        sub.add_argument("--max-tokens", type=at_least(1), default=None,
                         help="evaluate at most this many tokens (at least --seq; default: the whole text)")
        sub.add_argument("--prompt", default=default_prompt,
                         help="prompt of the greedy continuations ('' for none; default for eval: the first "
                              "words of the evaluation text)")
        sub.add_argument("--new-tokens", type=at_least(0), default=40, help="tokens per greedy continuation (0: none)")
        recipe_args(sub, ["none"])
    # the default scheme's recommended recipe next to every scheme's plain rounding (the others' recipes:
    # --recipe recommended, minutes more)
    demo.set_defaults(scheme=[*SCHEMES, f"{DEFAULT_SCHEME}+recommended"])
    evaluate.add_argument("--plot", help="write a PNG of per-layer SQNR per scheme, and for runs of several sizes "
                                         "(auto at several --bits, first-blocks) PLOT-bits.png: perplexity and "
                                         "agreement against the weight bits (needs matplotlib)")
    from .recipes import RECIPES

    inspect = command("inspect", _inspect, "the rewrite table of a model folder, without running it")
    model_args(inspect)
    recipe_args(inspect, ["none"])
    inspect.add_argument("--seq", type=at_least(1), default=256, help="tokens per calibration window")
    inspect.add_argument("--batch-size", type=at_least(1), default=8, help="calibration windows per forward")
    inspect.add_argument("--tp", type=at_least(1), default=1,
                         help="print each linear's tensor-parallel split at this TP size instead: kind, local K and "
                              "N, the scheme it runs and why")
    quantize = command("quantize", _quantize, "write a quantized checkpoint (msmodelslim layout) of a model folder")
    quantize.add_argument("--model", required=True, help="a local Hugging Face folder with bf16 weights")
    quantize.add_argument("--scheme", required=True, choices=[*SCHEMES, "auto"],
                          help="auto: mixed precision under --bits, one stored type per group of siblings")
    auto_args(quantize, list(WRITABLE_CANDIDATES))
    calibration_args(quantize)
    quantize.add_argument("--seq", type=at_least(1), default=256, help="tokens per calibration window")
    quantize.add_argument("--batch-size", type=at_least(1), default=8, help="calibration windows per forward")
    quantize.add_argument("--out", required=True, help="the new checkpoint folder (must not exist)")
    quantize.add_argument("--tp", type=at_least(1), default=1,
                          help="--scheme auto: choose only schemes whose K rules hold on the row-parallel linears' "
                               "K/TP slices, so the checkpoint loads at this TP size")
    quantize.add_argument("--recipe", choices=["recommended", *RECIPES],
                          help="write the codes of this accuracy-recovery recipe, with the smoothing scales and "
                               "rotation the activations need (default: plain round to nearest)")
    calibrate = command("calibrate", _calibrate, "write a calibration file (per-input statistics the recipes read)")
    calibrate.add_argument("--model", required=True, help="a local Hugging Face folder with bf16 weights")
    calibrate.add_argument("--out", dest="calibration", required=True,
                           help="the calibration file to write (safetensors; must not exist)")
    calibrate.add_argument("--seq", type=at_least(1), default=256, help="tokens per calibration window")
    calibrate.add_argument("--batch-size", type=at_least(1), default=8, help="windows per forward")
    calibration_args(calibrate, file=False)
    return top


def main(argv: list[str] | None = None) -> int:
    from .dynamo_backend import MXFXCompileError

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # bad input: the message says which file or option and why
        print(f"mxfx {args.command}: error: {error}", file=sys.stderr)
        return 2
    except MXFXCompileError as error:
        print(f"mxfx {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

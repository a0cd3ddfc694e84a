"""What mxfx does to a model, measured: perplexity, next-token agreement with bf16, per-layer output
SQNR, weight bytes, compile and run time, a greedy continuation. Used by `mxfx demo` and `mxfx eval`."""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mxfx import textdata
from mxfx.checkpoint.stored_linear import dequantized
from mxfx.dynamo_backend import backend
from mxfx.metrics import sqnr_db
from mxfx.prepared import PreparedWeights
from mxfx.schemes import SchemeSelector, get_scheme
from mxfx.targets import get_target
from passes import RewriteReport

SHIPPED_MODEL = Path(__file__).parent / "data" / "tiny-qwen3-pydoc"


class ModelError(ValueError):
    """A model folder mxfx cannot evaluate (the message says which and why)."""


def load_model(path: str | Path, bf16_weights: bool = True) -> torch.nn.Module:
    """A local Hugging Face Qwen3 folder as a bf16 model in eval mode; nothing is downloaded. A quantized
    checkpoint (quant_model_description.json) loads through mxfx.checkpoint: compile it with "modelslim";
    bf16_weights=False: its quantized linears hold their stored codes only (checkpoint.load)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from mxfx import checkpoint

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ModelError(f"{path} is a file, not a model folder")
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ModelError(f"{config_file}: not valid JSON ({error})") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "qwen3":
        raise ModelError(f"{config_file}: model_type is {model_type!r}; mxfx evaluates Qwen3 models ('qwen3')")
    if (path / checkpoint.DESCRIPTION).is_file():
        return checkpoint.load(path, bf16_weights=bf16_weights)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True).eval()
    except SafetensorError as error:  # the message names no file
        names = ", ".join(p.name for p in sorted(path.glob("*.safetensors")))
        raise ModelError(
            f"{path}: cannot read its safetensors weights ({names}; truncated or corrupt?): {error}") from error


class Tokenizer:
    """Encode/decode for a model folder: its Hugging Face tokenizer, or byte-level for mxfx's demo models."""

    def __init__(self, path: str | Path, model):
        path = Path(path)
        if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.encode, self.decode, self.end = tokenizer.encode, tokenizer.decode, tokenizer.eos_token_id
        elif model.config.vocab_size == textdata.VOCAB_SIZE:
            self.encode, self.decode, self.end = textdata.encode, textdata.decode, textdata.END_OF_TEXT
        else:
            raise ModelError(f"{path} has no tokenizer files and is not a byte-level mxfx model")


def windows(stream: torch.Tensor, seq: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seq + 1] windows of a token stream (inputs and their next tokens)."""
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    count = (len(stream) - 1) // seq
    if count == 0:
        raise ModelError(f"the evaluation text has {len(stream)} tokens, fewer than one window of {seq + 1}")
    return torch.stack([stream[i * seq : i * seq + seq + 1] for i in range(count)])


def model_input(windows: torch.Tensor) -> torch.Tensor:
    """The input ids of windows [n, seq + 1] (all but each one's last token), as a tensor of its own: Dynamo
    guards a view's base, so a slice here and the continuation's fresh tensor would compile two graphs."""
    return windows[:, :-1].contiguous()


@torch.no_grad()
def predictions_and_loss(model, batches: torch.Tensor, batch_size: int, desc: str) -> tuple[torch.Tensor, float]:
    """The predicted next token [n, seq] of every window and the mean next-token cross-entropy (only
    the argmax is kept: a real vocabulary's logits for a long text would take tens of GB). A non-finite
    loss is an error naming `desc`: its perplexity and agreement would mean nothing."""
    predictions, total = [], 0.0
    for batch in tqdm(batches.split(batch_size), desc=desc, leave=False, disable=None):
        logits = model(model_input(batch)).logits
        total += torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        predictions.append(logits.argmax(-1))
    if not math.isfinite(total):
        raise ModelError(f"{desc}: the loss is {total} (non-finite logits): the model or its quantized weights hold "
                         "inf/NaN, so no perplexity can be reported")
    return torch.cat(predictions), total / batches[:, 1:].numel()


@torch.no_grad()
def layer_inputs(model, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every nn.Linear of the model in one bf16 forward of `batch`."""
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: inputs.__setitem__(name, args[0])))
    try:
        model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


@torch.no_grad()
def layer_sqnr(model, inputs: dict[str, torch.Tensor], scheme: "str | SchemeSelector", names: list[str],
               cache: PreparedWeights | None = None) -> dict[str, float]:
    """Per named nn.Linear: SQNR (dB) of the quantized layer's output against the bf16 layer's, both fed
    the bf16 model's own input to that layer (`layer_inputs`; where a recipe's fold transforms it upstream,
    the quantized layer gets it so transformed: Scheme.folded_input), the bf16 output transformed as a fold
    transforms the layer's rows (v_proj's rotated, up_proj's scaled: Scheme.output_rows); a name that is no
    nn.Linear gets none. A linear holding stored codes only is dequantized for its bf16 output
    (checkpoint.dequantized). Each linear's weight is prepared for its turn only, unless a `cache` (e.g.
    mxfx.prepared.PREPARED) keeps them: the compiled graph holds merged siblings' constants, so kept ones
    would double the prepared bytes."""
    selector, target = get_scheme(scheme), get_target("reference")
    result = {}
    for name in filter(inputs.__contains__, names):
        layer, x = model.get_submodule(name), inputs[name]
        chosen = selector.scheme_for(layer.weight)  # a checkpoint's linears each have their own
        prepared = (cache.prepare(chosen, target, layer.weight, layer.bias, x.dtype) if cache is not None
                    else chosen.prepare(target, layer.weight, layer.bias, x.dtype))
        quantized = chosen.linear(target, chosen.folded_input(x), prepared)
        with dequantized(layer):
            result[name] = sqnr_db(chosen.output_rows(layer(x)), quantized)
    return result


@torch.no_grad()
def continuation(model, prompt: list[int], new_tokens: int, end: int | None) -> list[int]:
    """Greedy continuation of a prompt's token ids (stops at `end`): one forward of the whole sequence per
    new token, through the graph the evaluation compiled for its windows (dynamic shapes; the sequence
    goes in twice, since a batch of one would make Dynamo specialize it and compile another graph). A KV
    cache would save the re-reading of the prompt but needs two graphs of its own (prefill and decode):
    about 5 s of compiling per scheme on the shipped model, more than its 40 full forwards take."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        next_id = int(model(torch.tensor([tokens, tokens])).logits[0, -1].argmax())
        if next_id == end:
            break
        tokens.append(next_id)
    return tokens[len(prompt):]


@dataclass
class SchemeResult:
    scheme: str
    perplexity: float
    top1_agreement: float  # with the bf16 model's next-token choice
    compile_s: float
    run_s: float
    report: RewriteReport
    layer_sqnr: dict[str, float] = field(default_factory=dict)
    continuation: list[int] = field(default_factory=list)


@dataclass
class Evaluation:
    bf16_perplexity: float
    bf16_run_s: float
    bf16_continuation: list[int]
    tokens: int
    results: list[SchemeResult]


def evaluate(model, stream: torch.Tensor, schemes: "list[str | SchemeSelector]", seq: int = 256, batch_size: int = 8,
             max_tokens: int | None = None, prompt: list[int] | None = None, new_tokens: int = 40,
             end: int | None = None) -> Evaluation:
    """bf16 against each scheme (a name, or a selector such as a recipe's; compiled with mxfx on the
    reference target) on the same windows. The bf16 runs of a checkpoint loaded without bf16 weights are
    streamed: each linear's weight dequantized for its call (checkpoint.dequantized)."""
    batches = windows(stream, seq, max_tokens)
    with dequantized(model):
        start = time.perf_counter()
        bf16_predictions, bf16_loss = predictions_and_loss(model, batches, batch_size, "bf16")
        bf16_run_s = time.perf_counter() - start
        bf16_text = continuation(model, prompt, new_tokens, end) if prompt else []
        inputs = layer_inputs(model, batches[:1, :-1])
    results = []
    for scheme in schemes:  # names, or selectors (a mixed-precision plan)
        label = scheme if isinstance(scheme, str) else scheme.label
        torch._dynamo.reset()
        be = backend(scheme, target="reference")
        compiled = torch.compile(model, backend=be, dynamic=True, fullgraph=True)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(model_input(batches[:batch_size]))  # compile (the first call)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        predictions, loss = predictions_and_loss(compiled, batches, batch_size, label)
        run_s = time.perf_counter() - start
        report = be.reports[-1]
        results.append(SchemeResult(
            label, math.exp(loss), (predictions == bf16_predictions).float().mean().item(),
            compile_s, run_s, report,
            layer_sqnr(model, inputs, scheme, [r.fqn for r in report.rewritten]),
            continuation(compiled, prompt, new_tokens, end) if prompt else [],
        ))
    return Evaluation(math.exp(bf16_loss), bf16_run_s, bf16_text, batches[:, 1:].numel(), results)

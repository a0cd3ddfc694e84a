"""Loading a quantized checkpoint folder into a model.

A checkpoint is a Hugging Face folder (config.json, *.safetensors, optionally sharded with
model.safetensors.index.json) plus quant_model_description.json, which maps every tensor name to a type
(stored.py has the types and their layouts) or FLOAT (kept as it is: norms, embeddings, lm_head,
biases). Loading builds the model with each quantized linear's weight dequantized to bf16 (so the model
also runs eagerly) and adds its stored tensors to mxfx.stored_weights.STORED_WEIGHTS under that weight;
compiling with `mxfx.backend()` (or scheme="modelslim") then runs the stored tensors, never
re-quantizing.
"""

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from mxfx.stored_weights import STORED_WEIGHTS

from .stored import NOT_YET, TYPES, CheckpointError, QuantizedWeight, read_linear

DESCRIPTION = "quant_model_description.json"
INDEX = "model.safetensors.index.json"
FLOAT = "FLOAT"
HEADER_KEYS = ("version", "model_quant_type", "group_size", "metadata", "optional")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{index}: not a safetensors index ({error})") from error
        return [folder / name for name in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors files")
    return files


class _Tensors:
    """The folder's tensors by name, each read when asked for from its open (memory-mapped) safetensors
    file, so loading holds one linear's stored tensors at a time beside the model, never the checkpoint."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder = folder
        self.files: dict[str, tuple] = {}  # name -> (open file, path)
        for path in safetensors_files(folder):
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX} but missing")
            try:
                f = stack.enter_context(safe_open(path, framework="pt"))
            except Exception as error:  # safetensors raises its own error types for a bad header or a short file
                raise CheckpointError(f"{path}: cannot read safetensors (truncated or corrupt?): {error}") from error
            for name in f.keys():
                if name in self.files:
                    raise CheckpointError(f"{path}: tensor {name} is also in {self.files[name][1].name}")
                self.files[name] = (f, path)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def path(self, name: str) -> Path:
        return self.files[name][1]

    def __getitem__(self, name: str) -> torch.Tensor:
        f, path = self.files[name]
        try:  # a copy: a tensor still mapped from the file would change (or fault) if the file were rewritten
            return f.get_tensor(name).clone()
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read tensor {name}: {error}") from error


def read_description(folder: Path) -> tuple[dict[str, str], dict]:
    """(tensor name -> type, the header: version, group_size, ...), every type checked."""
    path = folder / DESCRIPTION
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {DESCRIPTION}: not a quantized (msmodelslim or mxfx) checkpoint")
    try:
        description = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from error
    if not isinstance(description, dict):
        raise CheckpointError(f"{path}: a JSON {type(description).__name__}, expected an object of tensor name -> type")
    types = {name: kind for name, kind in description.items() if name not in HEADER_KEYS}
    for name, kind in types.items():
        if kind in NOT_YET:
            raise CheckpointError(f"{path}: tensor {name} is {kind} ({NOT_YET[kind]}), which mxfx does not support yet")
        if kind != FLOAT and kind not in TYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has unknown type {kind!r}; known: {', '.join([FLOAT, *TYPES])}")
    return types, {key: description[key] for key in HEADER_KEYS if key in description}


def _plan(description: dict[str, str], tensors: _Tensors) -> tuple[list[str], dict[str, str]]:
    """The FLOAT tensor names and the quantized linears (prefix -> type), checked against the files'
    tensor names before anything is read: a missing, extra or mis-described tensor fails fast."""
    floats, quantized, used = [], {}, set()
    for name, kind in description.items():
        if name not in tensors:
            raise CheckpointError(f"{tensors.folder}: missing tensor {name} (in {DESCRIPTION} as {kind})")
        if kind == FLOAT:
            floats.append(name)
        elif name.endswith(".weight"):
            prefix, record = name.removesuffix(".weight"), TYPES[kind]
            quantized[prefix] = kind
            for suffix in record.required:
                if f"{prefix}.{suffix}" not in tensors:
                    raise CheckpointError(f"{tensors.folder}: missing tensor {prefix}.{suffix}: {kind} needs "
                                          f"{', '.join(record.required)}")
            present = {s for s in record.optional if f"{prefix}.{s}" in tensors}
            used |= {f"{prefix}.{suffix}" for suffix in record.suffixes(present)}
    for name in used:
        owner = name.rpartition(".")[0] + ".weight"
        if description.get(name, description[owner]) != description[owner]:
            raise CheckpointError(f"{DESCRIPTION}: {name} is described as {description[name]} but {owner} as "
                                  f"{description[owner]}")
    extra = sorted(set(tensors.files) - used - set(floats))
    if extra:
        name = extra[0]
        why = (f"described as {description[name]}, but no linear of that type stores it" if name in description
               else f"not in {DESCRIPTION}")
        raise CheckpointError(f"{tensors.path(name).name}: extra tensor {name} ({why})")
    return floats, quantized


def _empty_model(config) -> torch.nn.Module:
    """The architecture in bf16 with its parameters allocated but not initialised (every one is then
    replaced from the checkpoint); buffers such as RoPE frequencies are computed as usual."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor, source: str) -> None:
    """Replace a parameter (one _check_coverage found in the model) by a checkpoint tensor of its shape."""
    old = model.get_parameter(name)
    if value.shape != old.shape or not value.is_floating_point():
        raise CheckpointError(f"{source}: {name} is {value.dtype} {list(value.shape)}; the model's parameter is "
                              f"{old.dtype} {list(old.shape)}")
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(value.to(old.dtype), requires_grad=False)


def _check_coverage(model, floats: list[str], quantized: dict[str, str], tied: bool, folder: Path) -> None:
    """Every parameter of the model comes from the checkpoint, and nothing else does (before anything is
    read)."""
    if tied and "lm_head" in quantized:
        raise CheckpointError(f"{folder}: lm_head.weight is stored as {quantized['lm_head']}, but config.json ties "
                              "it to the embeddings, which would replace it")
    loaded = set(floats) | {f"{prefix}.weight" for prefix in quantized}
    parameters = set(dict(model.named_parameters(remove_duplicate=False)))
    unknown = sorted(loaded - parameters)
    if unknown:
        raise CheckpointError(f"{folder}: {unknown[0]} is not a parameter of a {model.config.model_type} model")
    missing = sorted(parameters - loaded - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def load(folder: str | Path) -> torch.nn.Module:
    """A quantized checkpoint folder as a bf16 model whose quantized linears' weights have their stored
    tensors in STORED_WEIGHTS (`stored_weights(model)` lists them).

    Names, types and the tensors' presence are checked first; then the tensors are read one linear at
    a time, so the peak is the model's bf16 weights plus its stored codes plus one linear.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json")
    description, header = read_description(folder)
    with ExitStack() as stack:
        tensors = _Tensors(folder, stack)
        floats, quantized = _plan(description, tensors)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        model = _empty_model(config)
        tied = getattr(config, "tie_word_embeddings", False)
        _check_coverage(model, floats, quantized, tied, folder)
        for name in tqdm(floats, desc="mxfx load (FLOAT)", unit="tensor", disable=None):
            _set_parameter(model, name, tensors[name], tensors.path(name).name)
        for prefix, kind in tqdm(quantized.items(), desc="mxfx load (quantized)", unit="linear", disable=None):
            name = f"{prefix}.weight"
            stored = read_linear(prefix, TYPES[kind], tensors, model.get_parameter(name).shape,
                                 header.get("group_size"))
            _set_parameter(model, name, stored.dequantize(), tensors.path(name).name)
            STORED_WEIGHTS.add(model.get_parameter(name), stored)
    if tied:
        model.tie_weights()
    return model


def stored_weights(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """Module FQN -> stored tensors of every linear of `model` whose weight came from a checkpoint."""
    return {name.removesuffix(".weight"): stored for name, parameter in model.named_parameters()
            if (stored := STORED_WEIGHTS.get(parameter)) is not None}


def scheme_of(folder: str | Path) -> str:
    """The scheme name to compile a checkpoint folder with: "modelslim" for any quantized checkpoint."""
    read_description(Path(folder))
    return "modelslim"

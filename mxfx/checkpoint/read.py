"""Loading a quantized checkpoint folder into a model.

A checkpoint is a Hugging Face folder (config.json, *.safetensors, optionally sharded with
model.safetensors.index.json) plus quant_model_description.json, which maps every tensor name to a type
(stored.py has the types and their layouts) or FLOAT (kept as it is: norms, embeddings, lm_head,
biases). Loading builds the model with each quantized linear's weight dequantized to bf16 (so the model
also runs eagerly), or with `bf16_weights=False` a placeholder of no size (stored_linear.py), and adds its
stored tensors to mxfx.stored_weights.STORED_WEIGHTS under that weight; compiling with `mxfx.backend()`
(or scheme="modelslim") then runs the stored tensors, never re-quantizing.
"""

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from mxfx.stored_weights import STORED_WEIGHTS

from .stored import (
    COMPANIONS,
    NOT_YET,
    ROTATION,
    SMOOTH,
    TYPES,
    CheckpointError,
    QuantizedWeight,
    read_linear,
    read_rotation,
    shard_index,
)
from .stored_linear import hold_codes_only

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


WRAPPED_SMOOTH = ".div.mul_scale"  # msmodelslim's non-fusion smoothing: p.div.mul_scale, the linear as p.linear.*


class _Tensors:
    """The folder's tensors by name, each read when asked for from its open (memory-mapped) safetensors
    file, so loading holds one linear's stored tensors at a time beside the model, never the checkpoint.
    Names are the model's: msmodelslim's wrapped smoothing export (`p.div.mul_scale`, `p.linear.weight`, ...)
    is read as `p.mul_scale`, `p.weight`, ... (`stored_name` gives the name in the file)."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder = folder
        self.files: dict[str, tuple] = {}  # name -> (open file, path, name in the file)
        opened = []
        for path in safetensors_files(folder):
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX} but missing")
            try:
                opened.append((stack.enter_context(safe_open(path, framework="pt")), path))
            except Exception as error:  # safetensors raises its own error types for a bad header or a short file
                raise CheckpointError(f"{path}: cannot read safetensors (truncated or corrupt?): {error}") from error
        self.wrapped = {name.removesuffix(WRAPPED_SMOOTH) for f, _ in opened for name in f.keys()
                        if name.endswith(WRAPPED_SMOOTH)}
        for f, path in opened:
            for stored in f.keys():
                name = self.model_name(stored)
                if name in self.files:
                    other = self.files[name]
                    raise CheckpointError(f"{path}: tensor {stored} is also in {other[1].name}"
                                          + (f" (as {other[2]})" if other[2] != stored else ""))
                self.files[name] = (f, path, stored)

    def model_name(self, stored: str) -> str:
        """A stored name as the model reads it (unwrapping msmodelslim's smoothed linears)."""
        if stored.endswith(WRAPPED_SMOOTH):
            return f"{stored.removesuffix(WRAPPED_SMOOTH)}.{SMOOTH}"
        head, wrapper, tail = stored.rpartition(".linear.")
        return f"{head}.{tail}" if wrapper and head in self.wrapped else stored

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def path(self, name: str) -> Path:
        return self.files[name][1]

    def stored_name(self, name: str) -> str:
        return self.files[name][2] if name in self.files else name

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        f, _, stored = self.files[name]
        return tuple(f.get_slice(stored).get_shape())

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor, or its `index` slice, of which only those bytes are read (safetensors get_slice)."""
        f, path, stored = self.files[name]
        try:  # a copy: a tensor still mapped from the file would change (or fault) if the file were rewritten
            return (f.get_slice(stored)[index] if index else f.get_tensor(stored)).clone()
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read tensor {stored}: {error}") from error


class _Shard:
    """One rank's view of one linear's tensors in a folder: each tensor read as the rank's slice of N rows
    and K columns (whole groups: stored.shard_index), as read_linear asks for them."""

    def __init__(self, tensors: _Tensors, kind, prefix: str, full: tuple[int, int], rows, cols):
        self.tensors, self.kind, self.prefix, self.full, self.rows, self.cols = tensors, kind, prefix, full, rows, cols

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def path(self, name: str) -> Path:
        return self.tensors.path(name)

    def stored_name(self, name: str) -> str:
        return self.tensors.stored_name(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.tensors.shape(name)
        axes = (1, 1) if self.kind is None else self.kind.axes(name.removeprefix(f"{self.prefix}."), shape, *self.full)
        return self.tensors.read(name, shard_index(name, axes, shape, self.full, self.rows, self.cols))


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
    tensor names before anything is read: a missing, extra or mis-described tensor fails fast. A quantized
    linear's companions (its smoothing scale) may be described FLOAT, as msmodelslim and vllm-omni do."""
    floats, quantized, used = [], {}, set()
    linears = {name.removesuffix(".weight") for name, kind in description.items()
               if kind != FLOAT and name.endswith(".weight")}
    for name, kind in description.items():
        if name not in tensors:
            raise CheckpointError(f"{tensors.folder}: missing tensor {tensors.stored_name(name)} "
                                  f"(in {DESCRIPTION} as {kind})")
        prefix, _, suffix = name.rpartition(".")
        if kind == FLOAT and not (prefix in linears and suffix in COMPANIONS):
            floats.append(name)
        elif kind != FLOAT and name.endswith(".weight"):
            record = TYPES[kind]
            quantized[prefix] = kind
            for suffix in record.required:
                if f"{prefix}.{suffix}" not in tensors:
                    raise CheckpointError(f"{tensors.folder}: missing tensor {prefix}.{suffix}: {kind} needs "
                                          f"{', '.join(record.required)}")
            present = {s for s in record.optional if f"{prefix}.{s}" in tensors}
            used |= {f"{prefix}.{suffix}" for suffix in record.suffixes(present)}
    for name in used:
        prefix, _, suffix = name.rpartition(".")
        owner = f"{prefix}.weight"
        if description.get(name, description[owner]) not in (description[owner], *[FLOAT] * (suffix in COMPANIONS)):
            raise CheckpointError(f"{DESCRIPTION}: {tensors.stored_name(name)} is described as {description[name]} "
                                  f"but {tensors.stored_name(owner)} as {description[owner]}")
    extra = sorted(set(tensors.files) - used - set(floats))
    if extra:
        name = extra[0]
        why = (f"described as {description[name]}, but no linear of that type stores it" if name in description
               else f"not in {DESCRIPTION}")
        raise CheckpointError(f"{tensors.path(name).name}: extra tensor {tensors.stored_name(name)} ({why})")
    return floats, quantized


def skeleton(config) -> torch.nn.Module:
    """The architecture on the meta device: its modules and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


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


def load(folder: str | Path, tp_rank: int = 0, tp_size: int = 1, bf16_weights: bool = True) -> torch.nn.Module:
    """A quantized checkpoint folder as a bf16 model whose quantized linears' weights have their stored
    tensors in STORED_WEIGHTS (`stored_weights(model)` lists them).

    Names, types and the tensors' presence are checked first; then the tensors are read one linear at
    a time, so the peak is the model's bf16 weights plus its stored codes plus one linear.

    bf16_weights=False: the quantized linears hold their codes only (stored_linear.StoredLinear, with a
    placeholder weight of one element), so the model is its codes plus its FLOAT tensors; it runs compiled
    with mxfx.backend(), and eagerly only inside `dequantized(model)`.

    tp_size > 1: the model of rank `tp_rank` (mxfx.parallel's split: q/k/v/gate/up by output rows,
    o/down_proj by input columns), each tensor read as that rank's slice only, along N or whole K-groups,
    never re-quantized; a split that would cut a group is refused, naming the tensor. Connect it to its
    group with mxfx.parallel.tensor_parallel(model) before running it (until then it refuses to run).
    """
    from transformers import AutoConfig

    from mxfx import parallel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json")
    if not 0 <= tp_rank < tp_size:
        raise CheckpointError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
    description, header = read_description(folder)
    layout = parallel.Layout(tp_rank, tp_size)
    with ExitStack() as stack:
        tensors = _Tensors(folder, stack)
        description = {tensors.model_name(name): kind for name, kind in description.items()}
        floats, quantized = _plan(description, tensors)
        rotation, rotated = read_rotation(header.get("optional"), quantized, folder / DESCRIPTION)
        smoothed = [f"{prefix}.{SMOOTH}" for prefix in quantized if f"{prefix}.{SMOOTH}" in tensors]
        if tp_size > 1 and (rotation is not None or smoothed):
            where, what = ((f"{DESCRIPTION}: optional.{ROTATION}", "rotated") if rotation is not None else
                           (f"{tensors.path(smoothed[0]).name}: {tensors.stored_name(smoothed[0])}", "smoothed"))
            raise CheckpointError(f"{folder / where}: tensor parallelism of a {what} (recovered) checkpoint is not "
                                  "supported yet; load it with tp_size=1")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        full = skeleton(config)
        try:
            parallel.check_divisible(full, tp_size)
        except parallel.ParallelError as error:
            raise CheckpointError(f"{folder}: {error}") from error
        kinds = parallel.linear_kinds(full) if tp_size > 1 else {}
        model = _empty_model(parallel.local_config(config, tp_size) if tp_size > 1 else config)
        if tp_rank:  # a row-parallel bias is added once, by rank 0
            dropped = {f"{name}.bias" for name, kind in kinds.items() if kind == parallel.ROW
                       and model.get_submodule(name).bias is not None}
            for name in dropped:
                model.get_submodule(name.removesuffix(".bias")).bias = None
            floats = [name for name in floats if name not in dropped]
        tied = getattr(config, "tie_word_embeddings", False)
        _check_coverage(model, floats, quantized, tied, folder)

        def view(name: str, kind=None):
            """The tensors of linear `name` as this rank reads them (all of them at TP=1 or replicated)."""
            split = kinds.get(name, parallel.REPLICATED)
            if split == parallel.REPLICATED:
                return tensors
            shape = tuple(full.get_submodule(name).weight.shape)
            rows = parallel.shard_range(shape[0], layout) if split == parallel.COLUMN else (0, shape[0])
            cols = parallel.shard_range(shape[1], layout) if split == parallel.ROW else (0, shape[1])
            return _Shard(tensors, kind, name, shape, rows, cols)

        for name in tqdm(floats, desc="mxfx load (FLOAT)", unit="tensor", disable=None):
            prefix, _, suffix = name.rpartition(".")
            source = view(prefix) if suffix == "weight" or kinds.get(prefix) == parallel.COLUMN else tensors
            _set_parameter(model, name, source[name], tensors.path(name).name)
        for prefix, kind in tqdm(quantized.items(), desc="mxfx load (quantized)", unit="linear", disable=None):
            name = f"{prefix}.weight"
            stored = read_linear(prefix, TYPES[kind], view(prefix, TYPES[kind]), model.get_parameter(name).shape,
                                 header.get("group_size"), rotation if prefix in rotated else None)
            if bf16_weights:
                _set_parameter(model, name, stored.dequantize(), tensors.path(name).name)
                STORED_WEIGHTS.add(model.get_parameter(name), stored)
            else:
                hold_codes_only(model.get_submodule(prefix), prefix, stored)
    if tied:
        model.tie_weights()
    if tp_size > 1:
        parallel.mark_sharded(model, layout)
    return model


def stored_weights(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """Module FQN -> stored tensors of every linear of `model` whose weight came from a checkpoint."""
    return {name.removesuffix(".weight"): stored for name, parameter in model.named_parameters()
            if (stored := STORED_WEIGHTS.get(parameter)) is not None}


def scheme_of(folder: str | Path) -> str:
    """The scheme name to compile a checkpoint folder with: "modelslim" for any quantized checkpoint."""
    read_description(Path(folder))
    return "modelslim"

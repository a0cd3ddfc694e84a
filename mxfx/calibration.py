"""Calibration statistics of a model's linear inputs: what smoothing (per-channel amax; its alpha search, a
sample of rows) and GPTQ (the K x K Gram matrix) read. `mxfx.calibrating.calibrate` collects them from the
traced graph; this module is the data: per distinct linear input (q/k/v read one activation, gate/up
another: each is counted once), the per-channel abs-max, sum(x^T x) (each batch's product in fp32, summed
in fp64) and a seeded uniform sample of its rows (bottom-k of one random key per row, in the input's dtype).
A Calibration is saved as one safetensors file whose metadata holds the JSON description (groups,
members, K, token count, model signature), and is checked against a model before it is used.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "mxfx-calibration/1"  # `i.sample` tensors are optional: files without them load (sample None)
SAMPLE_ROWS = 512


class CalibrationError(ValueError):
    """A calibration that cannot serve a model (the message names the linear and why)."""


@dataclass(frozen=True, eq=False)
class InputStats:
    """One activation, read by `members` (linear FQNs, in forward order): abs-max per channel [K] fp32,
    Gram sum(x^T x) [K, K] fp64 (None when not collected), over `tokens` rows; `sample`: [R, K] of those
    rows in the input's dtype (None when not collected, or in a file written before samples existed)."""

    members: tuple[str, ...]
    amax: torch.Tensor
    gram: torch.Tensor | None
    tokens: int
    sample: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.amax.shape[0]

    def check(self) -> None:
        name = self.members[0]
        if not torch.isfinite(self.amax).all():
            raise CalibrationError(f"calibration of {name}: its input abs-max has inf/NaN entries")
        if not (self.amax > 0).any():
            raise CalibrationError(f"calibration of {name}: its input abs-max is zero in every channel")
        if self.gram is not None:
            if self.gram.shape != (self.k, self.k):
                raise CalibrationError(f"calibration of {name}: Gram matrix {list(self.gram.shape)} for K={self.k}")
            if not torch.isfinite(self.gram).all():
                raise CalibrationError(f"calibration of {name}: its Gram matrix has inf/NaN entries")
        if self.sample is not None:
            if self.sample.dim() != 2 or self.sample.shape[1] != self.k or not len(self.sample):
                raise CalibrationError(f"calibration of {name}: input sample {list(self.sample.shape)} for K={self.k}")
            if not torch.isfinite(self.sample).all():
                raise CalibrationError(f"calibration of {name}: its input sample has inf/NaN entries")
        if self.tokens <= 0:
            raise CalibrationError(f"calibration of {name}: no tokens")


class Calibration:
    """Statistics per linear input; `stats(fqn)` finds a linear's. `signature`: each calibrated linear's
    FQN -> weight shape [N, K] (every linear of the model's graphs: nn.Linear modules, and F.linear calls
    on a module's own parameter, under that module's FQN), what `check(model)` compares."""

    def __init__(self, inputs: list[InputStats], signature: dict[str, tuple[int, int]]):
        self.inputs, self.signature = inputs, signature
        self._by_member = {member: stats for stats in inputs for member in stats.members}
        for stats in inputs:
            stats.check()

    def __repr__(self) -> str:
        tokens = self.inputs[0].tokens if self.inputs else 0
        return f"Calibration({len(self.inputs)} inputs of {len(self._by_member)} linears, {tokens} tokens)"

    def stats(self, fqn: str) -> InputStats:
        if fqn not in self._by_member:
            raise CalibrationError(f"linear {fqn} has no calibration statistics")
        return self._by_member[fqn]

    def check(self, model: torch.nn.Module) -> None:
        """Raise unless every calibrated linear is in `model` with the same shape and every linear of the
        model was calibrated (a calibration for another model is refused)."""
        linears = _linear_signature(model, self.signature)
        missing = sorted(set(linears) - set(self.signature))
        foreign = sorted(set(self.signature) - set(linears))
        if foreign:
            raise CalibrationError(f"the calibration is for another model: it has linear {foreign[0]}, which the "
                                   f"model lacks ({len(foreign)} such)")
        if missing:
            raise CalibrationError(f"linear {missing[0]} of the model has no calibration statistics "
                                   f"({len(missing)} such)")
        for name, shape in linears.items():
            self.check_linear(name, shape)

    def check_linear(self, fqn: str, shape: tuple[int, int]) -> None:
        """Raise unless linear `fqn` was calibrated with weight shape [N, K] = shape."""
        if fqn not in self.signature:
            raise CalibrationError(f"linear {fqn} has no calibration statistics (a calibration for another model?)")
        if self.signature[fqn] != tuple(shape):
            raise CalibrationError(f"the calibration is for another model: linear {fqn} is [N, K] = {list(shape)} "
                                   f"here, {list(self.signature[fqn])} in the calibration")

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors, groups = {}, []
        for index, stats in enumerate(self.inputs):
            tensors[f"{index}.amax"] = stats.amax.contiguous()
            if stats.gram is not None:
                tensors[f"{index}.gram"] = stats.gram.contiguous()
            if stats.sample is not None:
                tensors[f"{index}.sample"] = stats.sample.contiguous()
            groups.append({"members": list(stats.members), "tokens": stats.tokens})
        description = {"format": FORMAT, "inputs": groups, "signature": {k: list(v) for k, v in self.signature.items()}}
        save_file(tensors, str(path), metadata={"mxfx_calibration": json.dumps(description)})

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                raw = (file.metadata() or {}).get("mxfx_calibration")
                if raw is None:
                    raise CalibrationError(f"{path}: not an mxfx calibration file (no mxfx_calibration metadata)")
                description = json.loads(raw)
                if description.get("format") != FORMAT:
                    raise CalibrationError(f"{path}: calibration format {description.get('format')!r}, "
                                           f"expected {FORMAT}")
                names = set(file.keys())

                def optional(i, name):
                    return file.get_tensor(f"{i}.{name}") if f"{i}.{name}" in names else None

                inputs = [
                    InputStats(tuple(group["members"]), file.get_tensor(f"{i}.amax"), optional(i, "gram"),
                               int(group["tokens"]), optional(i, "sample"))
                    for i, group in enumerate(description["inputs"])
                ]
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            if isinstance(error, CalibrationError):
                raise
            raise CalibrationError(f"{path}: cannot read the calibration ({error})") from error
        return cls(inputs, {k: tuple(v) for k, v in description["signature"].items()})


def _linear_signature(model: torch.nn.Module, calibrated: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The model's linears [N, K]: every nn.Linear module's weight, and for each `calibrated` FQN naming
    another module (an F.linear call on its parameter, which only the graph shows) its 2-D parameter of
    the calibrated shape, else its first (which check_linear then refuses); one without any is absent."""
    linears = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears[name] = (module.out_features, module.in_features)
        elif name in calibrated:
            shapes = [tuple(p.shape) for p in module.parameters(recurse=False) if p.dim() == 2]
            if shapes:
                linears[name] = tuple(calibrated[name]) if tuple(calibrated[name]) in shapes else shapes[0]
    return linears


class Accumulator:
    """One activation's running statistics (what InputStats holds), batch by batch."""

    def __init__(self, k: int, gram: bool, rows: int, seed: int):
        self.amax = torch.zeros(k, dtype=torch.float32)
        self.gram = torch.zeros(k, k, dtype=torch.float64) if gram else None
        self.tokens = 0
        self.rows, self.generator = rows, torch.Generator().manual_seed(seed)
        self.sample, self.keys = None, torch.empty(0)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.rows:  # keep the rows with the `rows` smallest keys seen so far: a uniform sample without replacement
            sample = x if self.sample is None else torch.cat([self.sample, x.to(self.sample.dtype)])
            keys = torch.cat([self.keys, torch.rand(x.shape[0], generator=self.generator)])
            kept = keys.topk(min(self.rows, len(keys)), largest=False).indices.sort().values
            self.sample, self.keys = sample[kept].clone(), keys[kept]
        x = x.float()
        self.amax = torch.maximum(self.amax, x.abs().amax(0))
        if self.gram is not None:
            self.gram += (x.T @ x).double()
        self.tokens += x.shape[0]

"""The target table: which operator namespace a scheme emits, and which target "auto" means on this
machine. Schemes and passes never look at a device; they ask the target for an op by its torch_npu name."""

import dataclasses
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    """lacks: fused ops this target's graph compiler cannot lower; a scheme composes them from simpler ops
    there (`emits`), so the reference can run the same graph with the same `lacks`."""

    name: str
    namespace: str  # torch.ops.<namespace>.<torch_npu op name>
    lacks: frozenset[str] = frozenset()

    def emits(self, name: str) -> bool:
        return name not in self.lacks

    def without(self, names) -> "Target":
        return dataclasses.replace(self, lacks=self.lacks | frozenset(names)) if names else self

    def op(self, name: str) -> torch._ops.OpOverload:
        if self.namespace == "mxfx":
            import mxfx.ops  # noqa: F401  (registers torch.ops.mxfx)
        try:
            return getattr(getattr(torch.ops, self.namespace), name).default
        except (AttributeError, RuntimeError) as error:
            raise RuntimeError(
                f"target {self.name!r} needs torch.ops.{self.namespace}.{name}, which is not registered"
                + (" (import torch_npu first)" if self.namespace == "npu" else "")
            ) from error


# What torchair's GE mode (max-autotune) cannot lower: its only npu_rotate_quant converter
# (Ascend/torchair @ fced8842, python/torchair/_ge_concrete_graph/ge_converter/custom/rotate_quant.py) is the
# Atlas A2/A3 int8/int4 form (alpha a float, no axis / round_mode / scale_alg / dst_type_max; IR RotateQuant
# with int outputs only), and torch_npu's doc supports graph mode on A2/A3 only. GE graphs therefore rotate
# with a bmm and quantize with npu_dynamic_mx_quant (bit-identical for bf16 activations).
GE_LACKS = frozenset({"npu_rotate_quant"})

TARGETS = {
    "reference": Target("reference", "mxfx"),
    "npu": Target("npu", "npu"),
}


def get_target(target: "str | Target") -> Target:
    if isinstance(target, Target):
        return target
    if target == "auto":
        return TARGETS[auto_target()]
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of auto, {', '.join(TARGETS)}")
    return TARGETS[target]


def auto_target() -> str:
    """npu when torch_npu imports and an Ascend 950 is present, else the CPU reference (with a warning
    when an NPU is there but cannot run the MX operators). torch_npu is imported only if installed."""
    from mxfx.ops import npu as npu_support

    if not npu_support.npu_visible():
        return "reference"
    if (problem := npu_support.device_problem()) is not None:
        warnings.warn(f"mxfx: {problem}; compiling for the CPU reference target instead", stacklevel=4)
        return "reference"
    return "npu"

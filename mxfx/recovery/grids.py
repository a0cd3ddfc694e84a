"""The MX weight grids as GPTQ and the scale search walk them: scales chosen per 32-column group from the
current (error-updated) weights, then one column at a time rounded onto the group's grid. Codes and scales
are returned as the scheme's online weight quantizer returns them, so the layout and matmul are unchanged.

With scale_search="floor" the scales are the kernel's rule (a group quantized unchanged equals
npu_dynamic_(dual_level_)mx_quant of it, bit for bit); "mse" picks per 32-block between the floor
exponent and the next one up (no clipping above 6 / 448, coarser steps), whichever gives the lower
(column-weighted) squared error of the block. One departure from the dual-level kernel: a 32-block
whose byte is 0 (block max below 2^-124 after the level-0 division) is flushed to zero, where the
kernel flushes only blocks with no normal value.
"""

import torch

from mxfx.formats import e2m1_decode, e2m1_encode, e4m3_encode, pack_fp4, to_paired_scales
from mxfx.formats.dual_level import FP32_MIN_NORMAL, INV_E2M1_MAX, LEVEL0_BLOCK, LEVEL1_BLOCK
from mxfx.formats.e8m0 import biased_exponent, e8m0_decode, pow2_reciprocal, shared_scale_bytes
from mxfx.formats.elements import E2M1_EMAX, E2M1_MAX, E4M3_EMAX, E4M3_MAX

SCALE_SEARCHES = ("floor", "mse")
GROUP = LEVEL1_BLOCK


class _Grid:
    """Per-row scales of the current 32-column group, the codes written so far."""

    def __init__(self, n: int, k: int, scale_search: str, column_weight: torch.Tensor | None):
        if scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search must be one of {SCALE_SEARCHES}, got {scale_search!r}")
        if k % GROUP:
            raise ValueError(f"K={k} is not a multiple of {GROUP}")
        self.scale_search = scale_search
        self.column_weight = torch.ones(k) if column_weight is None else column_weight.float()
        self.bytes = torch.zeros(n, k // GROUP, dtype=torch.uint8)

    def _choose(self, group: torch.Tensor, col: int, floor_byte: torch.Tensor) -> torch.Tensor:
        """The group's byte per row: the floor rule's, or the lower-error of it and one up."""
        if self.scale_search == "floor":
            return floor_byte
        up = (floor_byte.int() + 1).clamp(max=254).to(torch.uint8)
        weight = self.column_weight[col:col + GROUP]
        errors = [((self._dequantize(group, byte, col) - group) ** 2 * weight).sum(1) for byte in (floor_byte, up)]
        return torch.where(errors[1] < errors[0], up, floor_byte)

    def start(self, w: torch.Tensor, col: int) -> None:
        """Called at each group's first column with the current weights [N, K]: its bytes, and the
        multipliers its columns are rounded with (computed once per group, not per column)."""
        group = w[:, col:col + GROUP]
        byte = self._choose(group, col, self._floor_byte(group, col))
        self.bytes[:, col // GROUP] = byte
        self.multipliers = self._multipliers(byte, col)

    def quantize(self, column: torch.Tensor, col: int) -> torch.Tensor:
        """Round one column onto its group's grid (recording the code); returns the dequantized column."""
        return self.quantize_group(column.unsqueeze(1), col).squeeze(1)

    def quantize_group(self, columns: torch.Tensor, col: int) -> torch.Tensor:
        """Round columns [N, c] from `col` (inside the group last started) onto its grid, recording their
        codes."""
        codes, values = self._round(columns, col, *self.multipliers)
        self.codes[:, col:col + columns.shape[1]] = codes
        return values

    def _dequantize(self, x, byte, col):
        """x [N, c] rounded onto the grid of `byte` [N] (a candidate's: nothing recorded)."""
        return self._round(x, col, *self._multipliers(byte, col))[1]


class DualLevelGrid(_Grid):
    """npu_dynamic_dual_level_mx_quant's grid: level-0 fp32 amax * fp32(1/6) per 512 columns, then
    x / level0 rounded to bf16, an E8M0 floor exponent per 32 and FP4 E2M1 codes."""

    def __init__(self, n, k, scale_search="floor", column_weight=None):
        super().__init__(n, k, scale_search, column_weight)
        self.level0 = torch.zeros(n, -(-k // LEVEL0_BLOCK))
        self.codes = torch.zeros(n, k, dtype=torch.uint8)

    def start(self, w, col):
        if col % LEVEL0_BLOCK == 0:
            level0 = w[:, col:col + LEVEL0_BLOCK].abs().amax(1) * INV_E2M1_MAX
            self.level0[:, col // LEVEL0_BLOCK] = level0.masked_fill(level0 < FP32_MIN_NORMAL, 0.0)
        super().start(w, col)

    def _temp(self, x, col):
        level0 = self.level0[:, col // LEVEL0_BLOCK].unsqueeze(1)
        return torch.where(x == 0, 0.0, x / level0).to(torch.bfloat16), level0

    def _floor_byte(self, group, col):
        amax = self._temp(group, col)[0].abs().amax(1)
        byte = shared_scale_bytes(amax, E2M1_EMAX, E2M1_MAX, "floor")
        return byte.masked_fill(biased_exponent(amax) == 0, 0)  # no normal value: zero codes (the kernel's rule)

    def _multipliers(self, byte, col):
        """(bf16 reciprocal of the block scale, 0 for byte 0; fp32 block scale * level 0), [N, 1] each."""
        reciprocal = pow2_reciprocal(byte, torch.bfloat16).masked_fill(byte == 0, 0.0).unsqueeze(1)
        return reciprocal, e8m0_decode(byte).unsqueeze(1) * self.level0[:, col // LEVEL0_BLOCK].unsqueeze(1)

    def _round(self, x, col, reciprocal, scale):
        codes = e2m1_encode(self._temp(x, col)[0] * reciprocal, "rint")
        return codes, e2m1_decode(codes) * scale

    def result(self) -> dict[str, torch.Tensor]:
        return {"q": pack_fp4(self.codes), "level0": self.level0, "level1": to_paired_scales(self.bytes)}


class SingleLevelGrid(_Grid):
    """npu_dynamic_mx_quant's grid (scale_alg 0): an E8M0 floor exponent per 32 columns (a block whose
    byte is 0 is flushed), FP4 E2M1 or FP8 E4M3 codes."""

    def __init__(self, n, k, fmt: str, scale_search="floor", column_weight=None):
        super().__init__(n, k, scale_search, column_weight)
        self.fp4 = fmt == "fp4_e2m1"
        self.emax, self.max_normal = (E2M1_EMAX, E2M1_MAX) if self.fp4 else (E4M3_EMAX, E4M3_MAX)
        self.codes = torch.zeros(n, k, dtype=torch.uint8 if self.fp4 else torch.float8_e4m3fn)

    def _floor_byte(self, group, col):
        return shared_scale_bytes(group.abs().amax(1), self.emax, self.max_normal, "floor")

    def _multipliers(self, byte, col):
        """(fp32 reciprocal of the block scale, 0 for byte 0; the block scale), [N, 1] each."""
        reciprocal = pow2_reciprocal(byte, torch.float32).masked_fill(byte == 0, 0.0).unsqueeze(1)
        return reciprocal, e8m0_decode(byte).unsqueeze(1)

    def _round(self, x, col, reciprocal, scale):
        codes = e2m1_encode(x * reciprocal, "rint") if self.fp4 else e4m3_encode(x * reciprocal)
        return codes, (e2m1_decode(codes) if self.fp4 else codes.float()) * scale

    def result(self) -> dict[str, torch.Tensor]:
        q = pack_fp4(self.codes) if self.fp4 else self.codes
        return {"q": q, "scale": to_paired_scales(self.bytes)}

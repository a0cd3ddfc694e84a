"""Element codecs: FP4 E2M1 (4-bit codes) and FP8 E4M3 (torch.float8_e4m3fn), both saturating.

E2M1 codes are sign-magnitude nibbles: bit 3 is the sign, bits 0-2 index the grid
0, 0.5, 1, 1.5, 2, 3, 4, 6 (OCP MX v1.0). Both encoders saturate to the format's largest finite value
(6 / 448) as the Ascend kernels do; NaN gives code 0 for E2M1 (it has no NaN) and NaN for E4M3.
"""

from functools import cache

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
# floor(log2(max finite)): the emax of the OCP shared-exponent rule
E2M1_EMAX = 2
E4M3_EMAX = 8

ROUND_MODES = ("rint", "round", "floor")

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _round_half_away(k: torch.Tensor) -> torch.Tensor:
    return torch.floor(k + 0.5)


# Rounding of the non-negative grid index k. "floor" is the Ascend golden's np.floor on the *signed*
# value, which for a negative input is a ceil of the magnitude (handled in e2m1_encode).
_ROUNDERS = {"rint": torch.round, "round": _round_half_away, "floor": torch.floor}


def check_round_mode(round_mode: str) -> None:
    if round_mode not in ROUND_MODES:
        raise ValueError(f"round_mode must be one of {ROUND_MODES}, got {round_mode!r}")


def _e2m1_encode_arith(x: torch.Tensor, round_mode: str) -> torch.Tensor:
    """E2M1 codes by arithmetic on fp32 values (any float dtype in, uint8 codes out)."""
    x32 = x.float()
    a = x32.abs()
    negative = torch.signbit(x32)
    # The E2M1 grid has spacing 0.5 below 2 (subnormals included), 1 in [2, 4) and 2 from 4 up, and the
    # code of a grid point is its index in that spacing plus 0, 2 or 4: code = k + offset.
    big = (a >= 2).to(torch.float32) + (a >= 4).to(torch.float32)  # 0, 1, 2
    spacing = torch.exp2(big - 1)
    k = a / spacing  # exact: division by a power of two
    if round_mode == "floor":
        # signed floor: magnitudes of negative values round up
        k = torch.where(negative, torch.ceil(k), torch.floor(k))
    else:
        k = _ROUNDERS[round_mode](k)
    code = torch.clamp(k + 2 * big, max=7)  # saturate (inf included)
    code = torch.where(torch.isnan(x32), 0, code)
    return code.to(torch.uint8) | (negative & ~torch.isnan(x32)).to(torch.uint8) << 3


@cache
def _e2m1_bf16_table(round_mode: str) -> torch.Tensor:
    """The E2M1 code of every bf16 bit pattern (index = the pattern as an unsigned 16-bit number)."""
    every_bf16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return _e2m1_encode_arith(every_bf16, round_mode)


def e2m1_encode(x: torch.Tensor, round_mode: str = "rint") -> torch.Tensor:
    """Round a float tensor to FP4 E2M1 and return its 4-bit codes as uint8 (one code per element).

    bf16 input goes through a 65,536-entry table built by the arithmetic encoder (one gather instead of
    a dozen full-size passes); other dtypes are encoded arithmetically in fp32.
    """
    check_round_mode(round_mode)
    if x.dtype != torch.bfloat16:
        return _e2m1_encode_arith(x, round_mode)
    index = x.contiguous().view(torch.int16).reshape(-1).to(torch.int32).bitwise_and_(0xFFFF)
    return _e2m1_bf16_table(round_mode).index_select(0, index).view(x.shape)


@cache
def _e2m1_values(dtype: torch.dtype) -> torch.Tensor:
    magnitudes = torch.tensor(E2M1_GRID, dtype=torch.float32)
    return torch.cat([magnitudes, -magnitudes]).to(dtype)


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of E2M1 codes (uint8, low 4 bits used; code 8 is -0.0)."""
    return _e2m1_values(dtype)[(codes & 0xF).long()]


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """Round to FP8 E4M3 (float8_e4m3fn) half-to-even, saturating to +-448; NaN stays NaN."""
    # Clamping first makes torch's RNE cast saturating: values in (448, 464) round to 448 either way.
    return torch.clamp(x, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

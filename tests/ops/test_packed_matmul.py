"""The MX matmuls from packed operands (mxfx.formats.native.mx_matmul and the torch fallback) against the
golden-order oracle (tests/formats/golden.mx_matmul_golden) on random codes and scale bytes: every
layout the mirrors take, ragged K and N, M = 1, zero blocks, saturation and NaN scales; the AVX512-BF16
path, the portable C path (MXFX_MATMUL=portable) and the torch code (MXFX_KERNELS=torch).

FP4 x FP4 (dual level, mxfp4) is bit-identical to the oracle: every 32-sum is exact. With an FP8 operand
the 32-sums round (the oracle sums exactly, then rounds once), so the difference is bounded by
2**-18 * (|A| @ |B|^T) of the dequantized operands; the two C paths agree bit for bit."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import mxfx.ops  # noqa: F401  (registers torch.ops.mxfx)
from mxfx.formats import native
from tests.formats import golden

ops = torch.ops.mxfx
FP32, E8M0, FP4, FP8 = 6, 293, 296, torch.float8_e4m3fn
# mode: (activation format, weight format)
MODES = {"dual": ("fp4", "fp4"), "mxfp4": ("fp4", "fp4"), "w4a8_nz": ("fp8", "fp4"), "w4a8_k_major": ("fp8", "fp4"),
         "mxfp8": ("fp8", "fp8"), "mxfp8_vllm": ("fp8", "fp8")}
PATHS = ["avx512_bf16", "portable", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "torch":
        with native.use("torch"):
            yield "torch"
        return
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    if request.param == "portable":
        monkeypatch.setenv("MXFX_MATMUL", "portable")
    elif native.matmul_path() != "avx512_bf16":
        pytest.skip("no AVX512-BF16 on this CPU or compiler")
    with native.use("native"):
        yield request.param


class Operands:
    """Random codes (every byte value, NaN E4M3 bytes only with nan_elements) and scale bytes."""

    def __init__(self, mode, m, k, n, seed=0, scale_range=(118, 136), nan_elements=False):
        self.mode, self.m, self.k, self.n = mode, m, k, n
        self.fa, self.fb = MODES[mode]
        g = torch.Generator().manual_seed(seed)
        self.groups = math.ceil(k / 32)
        self.a = self._codes(self.fa, m, g, nan_elements)
        self.b = self._codes(self.fb, n, g, nan_elements)
        self.sa = torch.randint(*scale_range, (m, self.groups), generator=g, dtype=torch.uint8)
        self.sb = torch.randint(*scale_range, (n, self.groups), generator=g, dtype=torch.uint8)
        g0 = math.ceil(k / 512)
        self.l0a = torch.rand(m, g0, generator=g) * 2 - 1  # negative level-0 scales too, as op-plugin tests
        self.l0b = torch.rand(g0, n, generator=g) * 2 - 1

    def _codes(self, fmt, rows, g, nan_elements):
        if fmt == "fp4":
            return torch.randint(0, 256, (rows, self.k // 2), generator=g, dtype=torch.uint8)
        codes = torch.randint(0, 256, (rows, self.k), generator=g, dtype=torch.uint8)
        return codes if nan_elements else torch.where((codes & 0x7F) == 0x7F, codes - 1, codes)

    @staticmethod
    def paired(scale):
        pad = scale.shape[1] % 2
        return torch.nn.functional.pad(scale, (0, pad)).reshape(scale.shape[0], -1, 2)

    def values(self, codes, fmt):
        if fmt == "fp4":
            v = golden.decode_fp4_packed(codes.numpy())
        else:
            v = codes.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return np.pad(v, ((0, 0), (0, 32 * self.groups - self.k)))

    def expected(self):
        level0 = (self.l0a.numpy(), self.l0b.numpy()) if self.mode == "dual" else None
        return golden.mx_matmul_golden(self.values(self.a, self.fa), self.sa.numpy(), self.values(self.b, self.fb),
                                       self.sb.numpy(), level0)

    def bound(self):
        """2**-18 * (|A| @ |B|^T), the dequantized operands (FP8 sums round; FP4 x FP4 gets 0)."""
        if (self.fa, self.fb) == ("fp4", "fp4"):
            return 0.0
        scale = lambda s: np.repeat(golden.e8m0_value(s.numpy()), 32, axis=1)  # noqa: E731
        with np.errstate(all="ignore"):
            a = np.abs(self.values(self.a, self.fa)) * scale(self.sa)
            b = np.abs(self.values(self.b, self.fb)) * scale(self.sb)
            return 2.0**-18 * (a @ b.T)

    def run(self, device="cpu"):
        """The op's fp32 result (on the CPU), the operands on `device`."""
        if device != "cpu":
            moved = {name: getattr(self, name) for name in ("a", "b", "sa", "sb", "l0a", "l0b")}
            try:
                for name, t in moved.items():
                    setattr(self, name, t.to(device))
                return self.run().cpu()
            finally:
                for name, t in moved.items():
                    setattr(self, name, t)
        pa, pb = self.paired(self.sa), self.paired(self.sb)
        if self.mode == "dual":
            x2 = ops.npu_format_cast(self.b.view(torch.int8), 29)
            return ops.npu_dual_level_quant_matmul(self.a, x2, self.l0a, self.l0b, pa, pb, output_dtype=FP32)
        kwargs = {"pertoken_scale": pa, "scale_dtype": E8M0, "pertoken_scale_dtype": E8M0, "output_dtype": FP32}
        x1 = self.a if self.fa == "fp4" else self.a.view(FP8)
        scale = pb.transpose(0, 1)
        if self.mode == "mxfp4":
            x2, kwargs = self.b.transpose(0, 1), {**kwargs, "x1_dtype": FP4, "x2_dtype": FP4}
        elif self.mode == "w4a8_nz":
            x2 = ops.npu_format_cast(self.b, 29, customize_dtype=FP8, input_dtype=FP4).transpose(-1, -2)
            kwargs = {**kwargs, "x2_dtype": FP4}
        elif self.mode == "w4a8_k_major":
            x2 = ops.npu_format_cast(self.b.t().contiguous(), 29, customize_dtype=FP8, input_dtype=FP4)
            kwargs = {**kwargs, "x2_dtype": FP4}
        elif self.mode == "mxfp8":
            x2 = self.b.view(FP8).t()
        else:  # vllm-ascend W8A8_MXFP8: weight.T.contiguous(), the scale's [K/64, N, 2] view made contiguous
            x2, scale = self.b.view(FP8).t().contiguous(), scale.contiguous()
        return ops.npu_quant_matmul(x1, x2, scale, **kwargs)


def assert_matches(got: torch.Tensor, ops_: Operands):
    want, bound = ops_.expected(), ops_.bound()
    got = got.numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    if np.isscalar(bound):  # exact: bit for bit
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), nan)
        differ = got[~nan].view(np.int32) != want[~nan].view(np.int32)
        assert not differ.any(), (f"{ops_.mode}: {differ.sum()} elements differ, e.g. {got[~nan][differ][:3]} vs "
                                  f"{want[~nan][differ][:3]}")
        return
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])
    excess = np.abs(got[finite].astype(np.float64) - want[finite]) - bound[finite]
    assert excess.max(initial=0) <= 0, f"{ops_.mode}: off by more than the bound by {excess.max()}"


SHAPES = [(1, 512, 16), (1, 1024, 40), (3, 64, 1), (9, 1536, 33), (2, 48, 17), (17, 528, 50), (8, 32, 7), (5, 96, 36)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m, k, n", SHAPES, ids=lambda v: str(v))
def test_random_codes_match_the_golden_order(mode, m, k, n, path):
    if mode == "dual" and k % 2:
        pytest.skip("FP4 K is even")
    operands = Operands(mode, m, k, n, seed=m * 7 + k + n)
    assert_matches(operands.run(), operands)


def _special(operands: Operands, case: str) -> Operands:
    if case == "zero_blocks":  # zero codes in some groups of both operands and a whole zero row
        per = 16 if operands.fa == "fp4" else 32
        operands.a[:, :per] = 0
        operands.a[-1] = 0
        operands.b[:, per:3 * per] = 0
    elif case == "saturation":  # every element at its maximum: finite at scale 127, inf at 254
        for name, fmt in (("a", operands.fa), ("b", operands.fb)):
            getattr(operands, name).fill_(0x77 if fmt == "fp4" else 0x7E)
        operands.sa.fill_(127)
        operands.sb.fill_(127)
        operands.sa[0] = 254
        operands.sb[0] = 254
        operands.l0a.fill_(1.0)
        operands.l0b.fill_(1.0)
    elif case == "nan_scales":  # 0xFF in one activation row's last group and in one weight row's first
        operands.sa[0, -1] = 0xFF
        operands.sb[-1, 0] = 0xFF
    elif case == "tiny_scales":  # products near and below the fp32 normal range
        operands.sa.fill_(1)
        operands.sb.fill_(20)
    return operands


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["zero_blocks", "saturation", "nan_scales", "tiny_scales", "nan_elements"])
def test_special_values(mode, case, path):
    if case == "nan_elements" and "fp8" not in MODES[mode]:
        pytest.skip("E2M1 has no NaN")
    operands = _special(Operands(mode, 5, 1024, 37, seed=3, nan_elements=case == "nan_elements"), case)
    got = operands.run()
    assert_matches(got, operands)
    if case == "saturation":
        assert torch.isinf(got[0]).all() and torch.isfinite(got[1:, 1:]).all()
    if case == "nan_scales":
        assert torch.isnan(got[0]).all() and torch.isnan(got[:, -1]).all() and not torch.isnan(got[1:, :-1]).any()


@pytest.mark.parametrize("mode", ["dual", "mxfp8"])
def test_the_c_paths_agree_bit_for_bit_and_threads_do_not_change_the_result(mode, monkeypatch):
    if not native.available() or native.matmul_path() != "avx512_bf16":
        pytest.skip("needs the AVX512-BF16 path")
    operands = Operands(mode, 3, 512, 1000, seed=5)
    with native.use("native"):
        vector = operands.run()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(operands.run(), vector)
        finally:
            torch.set_num_threads(threads)
        monkeypatch.setenv("MXFX_MATMUL", "portable")
        assert native.matmul_path() == "portable"
        assert torch.equal(operands.run(), vector)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_the_golden_order(mode):
    """On CUDA the torch code runs (decoded operands, one group at a time), in the same order."""
    for m, k, n in ((1, 1024, 40), (9, 528, 33)):
        operands = Operands(mode, m, k, n, seed=11)
        assert_matches(operands.run("cuda"), operands)


def test_fp8_values_are_exact_in_bf16():
    """Why the bf16 dot products are exact: every E4M3 and E5M2 value is a bf16 value (so is every E2M1
    one), and the product of two bf16 values is exact in fp32."""
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
        through = values.bfloat16().float()
        assert torch.equal(values.isnan(), through.isnan())
        assert torch.equal(values[~values.isnan()], through[~through.isnan()])


def test_matmul_path_env_is_checked(monkeypatch):
    monkeypatch.setenv("MXFX_MATMUL", "fast")
    with pytest.raises(ValueError, match="MXFX_MATMUL"):
        native.matmul_path()

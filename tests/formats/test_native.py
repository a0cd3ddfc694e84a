"""The native C kernels (mxfx.formats.native) against the torch code, byte for byte.

Every comparison is on raw bytes (floats viewed as int32 / uint8), so -0 vs +0 and NaN payloads count.
Skipped only when the kernels cannot be built (no C compiler).
"""

import subprocess
import threading

import numpy as np
import pytest
import torch

from mxfx.formats import native, quantize_dual_level, quantize_mx

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native MX kernels unavailable: {native.unavailable_reason()}")

DTYPES = [torch.bfloat16, torch.float16]
MX_COMBOS = [("fp8_e4m3", alg, "rint") for alg in ("floor", "ocp", "rceil")] + [
    ("fp4_e2m1", alg, rm) for alg in ("floor", "ocp") for rm in ("rint", "round", "floor")
]
ROUND_MODES = ["rint", "round", "floor"]


def _raw(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.uint8)


def assert_same(native_out, torch_out, what=""):
    assert len(native_out) == len(torch_out)
    for i, (a, b) in enumerate(zip(native_out, torch_out)):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{what} output {i}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        ra, rb = _raw(a), _raw(b)
        if not torch.equal(ra, rb):
            bad = (ra != rb).nonzero()[:5].tolist()
            raise AssertionError(
                f"{what} output {i} differs at {bad}: native {ra[tuple(bad[0])]} torch {rb[tuple(bad[0])]}")


def both(fn, x, *args, **kwargs):
    with native.use("torch"):
        expected = fn(x, *args, **kwargs)
    with native.use("native"):
        got = fn(x, *args, **kwargs)
    assert_same(got, expected, f"{fn.__name__}{args}{kwargs} {x.dtype}{list(x.shape)}")


def check_all(x: torch.Tensor, block_sizes=(32,)):
    """x through quantize_dual_level (every round mode) and quantize_mx (every valid combination)."""
    if x.shape[-1] % 2 == 0:
        for rm in ROUND_MODES:
            both(quantize_dual_level, x, rm)
    for fmt, alg, rm in MX_COMBOS:
        if fmt == "fp4_e2m1" and x.shape[-1] % 2:
            continue
        for bs in block_sizes:
            both(quantize_mx, x, fmt, block_size=bs, scale_alg=alg, round_mode=rm)


def _randn(shape, dtype, scale_exp, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 10.0**scale_exp).to(dtype)


# ------------------------------------------------------------------------------------------ random


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_scales(dtype):
    """randn * 10**k for every k the dtype can hold (and beyond: inf), a few shapes per k."""
    ks = range(-38, 39) if dtype == torch.bfloat16 else range(-8, 6)
    shapes = [(2, 64), (3, 544), (1, 2, 96)]
    for k in ks:
        x = _randn(shapes[k % 3], dtype, k, seed=k + 100)
        check_all(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [32, 64, 96, 512, 544, 1536, 4096, 2, 30, 100, 1000])
def test_shapes_and_tails(dtype, k):
    """K a multiple of the blocks and not (short tail blocks), ranks 1-3, several block sizes."""
    shape = {32: (k,), 64: (3, k), 96: (2, 3, k), 512: (4, k), 544: (2, 2, k), 1536: (2, k),
             4096: (2, k)}.get(k, (3, k))
    x = _randn(shape, dtype, 0, seed=k)
    x.view(-1)[::5] *= 1e3  # blocks with a wide range
    check_all(x, block_sizes=(32, 64, 96) if k in (96, 100, 1000, 544) else (32, 1024))


def test_mixed_magnitudes_per_row():
    rows = [_randn((1, 512), torch.bfloat16, s, seed=s + 7) for s in (-35, -20, -5, 0, 5, 20, 35)]
    check_all(torch.cat(rows))


def test_non_contiguous_and_threaded():
    x = _randn((64, 2048), torch.bfloat16, 1, seed=3)  # large enough to be split across threads
    check_all(x.t().contiguous().t()[:, :1024], block_sizes=(32, 256))
    check_all(x)


# ------------------------------------------------------------------------------------- hand built


def _edge_rows(dtype):
    finfo = torch.finfo(dtype)
    sub = finfo.smallest_normal / 8  # a subnormal of the dtype
    inf, nan = float("inf"), float("nan")
    rows = [
        [0.0, -0.0] * 16,  # zero block
        [-0.0] * 32,
        [1.0, inf, -2.0] + [0.5] * 29,
        [-inf] + [1.0] * 31,
        [nan, 1.0, -0.0] + [3.0] * 29,
        [inf, -inf, nan] + [0.0] * 29,
        [sub, -sub, 2 * sub, -0.0] + [0.0] * 28,  # subnormal-only block
        [finfo.tiny, -finfo.tiny / 2] + [0.0] * 30,
        [finfo.max, -finfo.max, 1.0, -1e-3] + [finfo.max / 3] * 28,  # past the element max
        [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 7.0]
        + [-7.0, 6.5, -6.5, 8.0, 12.0, -0.1, 0.1, 0.3, -0.3, 0.5, -0.5, 1.0, -1.0, 4.0, -4.0, 3.0],  # E2M1 ties
        [448.0, 464.0, 480.0, -500.0, 1 + 1 / 16, 1 + 3 / 16, 2.0**-10, 3 * 2.0**-10, 248.0, 0.0001]
        + [-1.0] * 22,  # E4M3 ties and saturation
        [2.0**100 if dtype == torch.bfloat16 else 2.0**15, -(2.0**-100) if dtype == torch.bfloat16 else -(2.0**-14)]
        + [2.0**-30] * 30,  # underflow after scaling
    ]
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_blocks(dtype):
    x = _edge_rows(dtype)  # [12, 32]
    check_all(x)
    # the same blocks side by side: 512-blocks (dual level) mixing them, and larger MX blocks
    check_all(x.reshape(-1, 64), block_sizes=(32, 64))
    check_all(x.reshape(1, -1), block_sizes=(32, 64, 96, 128))
    for i in range(x.shape[0]):  # each edge block inside an otherwise normal 512-block
        row = _randn((1, 512), dtype, 0, seed=i)
        row[0, 64:96] = x[i]
        check_all(row, block_sizes=(32, 512))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_blocks_byte0(dtype):
    """Blocks whose scale byte is 0 (floor: flushed; ocp: scaled by 2**127) and level0 underflow."""
    e = np.arange(-150, -100) if dtype == torch.bfloat16 else np.arange(-26, -10)
    vals = torch.tensor(np.ldexp(1.5, e), dtype=torch.float64)
    x = torch.zeros(len(vals), 64, dtype=torch.float64)
    x[:, 0] = vals
    x[:, 1] = -vals / 3
    x[:, 33] = -vals
    check_all(x.to(dtype))


# --------------------------------------------------------------------------------- every bf16 value


def _every_bf16():
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("layout", ["ordered", "shuffled"])
def test_every_bf16_pattern(layout):
    x = _every_bf16()
    if layout == "shuffled":
        x = x[torch.randperm(65536, generator=torch.Generator().manual_seed(0))]
    x = x.reshape(128, 512)
    for rm in ROUND_MODES:
        both(quantize_dual_level, x, rm)
    for fmt, alg, rm in MX_COMBOS:
        both(quantize_mx, x, fmt, scale_alg=alg, round_mode=rm)


def test_every_fp16_pattern():
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = x[torch.randperm(65536, generator=torch.Generator().manual_seed(1))].reshape(128, 512)
    for rm in ROUND_MODES:
        both(quantize_dual_level, x, rm)
    for fmt, alg, rm in MX_COMBOS:
        both(quantize_mx, x, fmt, scale_alg=alg, round_mode=rm)


@pytest.mark.parametrize("rm", ROUND_MODES)
def test_e2m1_encoder_on_every_bf16_and_random_fp32(rm):
    from mxfx.formats.elements import _e2m1_encode_arith

    g = torch.Generator().manual_seed(2)
    x = torch.cat([_every_bf16().float(), torch.randn(1 << 16, generator=g) * 4, torch.rand(1 << 16, generator=g) * 8])
    assert torch.equal(native.e2m1_encode_f32(x, rm), _e2m1_encode_arith(x, rm))


# ------------------------------------------------------------------------------------- dispatch


def test_mode_selection(monkeypatch):
    x = _randn((4, 64), torch.bfloat16, 0, seed=5)
    monkeypatch.setenv("MXFX_KERNELS", "torch")
    assert native.mode() == "torch" and native.try_quantize_mx(x, "fp8_e4m3", 32, "floor", "rint") is None
    monkeypatch.setenv("MXFX_KERNELS", "native")
    assert native.try_quantize_dual_level(x, "rint") is not None
    with native.use("torch"):
        assert native.try_quantize_dual_level(x, "rint") is None
    assert native.try_quantize_mx(x.float(), "fp8_e4m3", 32, "floor", "rint") is None  # fp32: torch code
    monkeypatch.setenv("MXFX_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MXFX_KERNELS"):
        quantize_dual_level(x)


def test_rows_split_across_threads_and_concurrent_callers(monkeypatch):
    """Small tensors split into row ranges on OpenMP threads (the threshold lowered), from several threads at
    once while another thread changes torch's thread count: same bytes as the torch code."""
    from mxfx.formats import native as native_module

    monkeypatch.setattr(native_module, "_MIN_PARALLEL_ELEMENTS", 64)
    x = _randn((37, 512), torch.bfloat16, 0, seed=5)
    with native.use("torch"):
        expected = quantize_dual_level(x)
    results, errors = [], []

    def worker():
        try:
            with native.use("native"):
                for _ in range(20):
                    results.append(quantize_dual_level(x))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    original = torch.get_num_threads()
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for n in (1, 2, 4, 2):
        torch.set_num_threads(n)
    for t in threads:
        t.join()
    torch.set_num_threads(original)
    assert not errors and len(results) == 60
    for result in results:
        assert_same(result, expected)


# ---------------------------------------------------------------------------------------- stack

STACK_BUDGET = 16 * 1024


def test_stack_frames_within_budget(tmp_path):
    """The kernels run on their callers' threads and OpenMP's, whose stacks may be small (musl: 128 KiB):
    every function's frame, built with the project's flags, stays under STACK_BUDGET. (No compiler: skipped with
    the module.)"""
    built = subprocess.run([native._compiler(), *native._FLAGS, "-Werror", "-fstack-usage", "-o", "kernels.so",
                            str(native._SOURCE)],
                           cwd=tmp_path, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    frames = {}
    for su in tmp_path.glob("*.su"):
        for line in su.read_text().splitlines():
            where, size, kind = line.rsplit("\t", 2)
            frames[where.rsplit(":", 1)[-1]] = (int(size), kind)
    assert "mx_quant_bf16" in frames and "dual_level_quant_fp16" in frames, frames
    over = {name: f for name, f in frames.items() if f[0] > STACK_BUDGET or f[1] == "dynamic"}
    assert not over, f"stack frames over {STACK_BUDGET} bytes (or unbounded): {over}"


def test_small_thread_stack():
    """Every quantizer, with group tails and ragged rows, on a thread with a 128 KiB stack (musl's default;
    the kernels' 178 KiB frames once overflowed it and crashed the process)."""
    errors = []

    def worker():
        try:
            for dtype in DTYPES:
                check_all(_randn((3, 1000), dtype, 0, seed=11), block_sizes=(32, 1024))
                check_all(_randn((4, 1056), dtype, 0, seed=12), block_sizes=(96, 1024))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    previous = threading.stack_size(128 * 1024)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    assert not errors, errors

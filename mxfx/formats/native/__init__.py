"""Native (C) kernels for quantize_dual_level and quantize_mx, bit-identical to the torch code, and the
MX matmuls that read packed operands (mx_matmul: the order of their arithmetic is in mx_kernels.c).

mx_kernels.c is compiled on first use with the system C compiler (-O3 -march=native, never -ffast-math),
cached under ${XDG_CACHE_HOME:-~/.cache}/mxfx/ keyed by source, flags, compiler and CPU, and loaded
with ctypes (which releases the GIL); each call splits its rows (the matmul: its columns) into ranges that
run on OpenMP threads, torch's own (-fopenmp: the process loads one libgomp, so the kernels use the threads
torch's parallel regions use instead of competing with them).

The implementation is chosen by the environment variable MXFX_KERNELS (read at each call):
  auto    (default) native where it covers the call and a compiler works; otherwise the torch code,
          with one warning saying why;
  torch   never native;
  native  native where it covers the call; RuntimeError if the kernel cannot be built.
`use(mode)` overrides the variable for a `with` block (tests and benchmarks use it).

The matmul takes the AVX512-BF16 path (VDPBF16PS) where the CPU and compiler have it, else plain C fp32;
MXFX_MATMUL=portable (read at each call) forces the plain C path. Both compute the same sums in the
same order, so their results are identical.
"""

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

MODES = ("auto", "torch", "native")
_SOURCE = Path(__file__).with_name("mx_kernels.c")
# -Wall -Wextra everywhere; warnings are errors in CI (its first use builds in a fresh cache) and in the
# tests' own build (test_native), not on users' machines, where a newer compiler's new warning would
# only cost them the fast kernels
_FLAGS = ["-std=c99", "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wextra",
          *(["-Werror"] if os.environ.get("CI") else []), "-shared", "-fPIC"]
_ABI_VERSION = 4
# below this many elements per range one range on the caller's thread beats waking OpenMP threads
_MIN_PARALLEL_ELEMENTS = 1 << 18

_ROUND_MODES = {"rint": 0, "round": 1, "floor": 2}
_SCALE_ALGS = {"floor": 0, "ocp": 1, "rceil": 2}
_FORMATS = {"fp8_e4m3": 0, "fp4_e2m1": 1}
_I64, _INT = ctypes.c_int64, ctypes.c_int

_lock = threading.Lock()
_state: dict = {}  # "lib" or "error"; "warned"
_override = threading.local()


# ------------------------------------------------------------------------------------------ mode


def mode() -> str:
    """The implementation choice in force: use() inside a with block, else $MXFX_KERNELS, else auto."""
    chosen = getattr(_override, "mode", None) or os.environ.get("MXFX_KERNELS", "auto").strip().lower() or "auto"
    if chosen not in MODES:
        raise ValueError(f"MXFX_KERNELS must be one of {MODES}, got {chosen!r}")
    return chosen


@contextlib.contextmanager
def use(chosen: str):
    """Force an implementation ("auto", "torch" or "native") in this thread for the with block."""
    if chosen not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {chosen!r}")
    previous = getattr(_override, "mode", None)
    _override.mode = chosen
    try:
        yield
    finally:
        _override.mode = previous


# ------------------------------------------------------------------------------------- building


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            path = shutil.which(candidate.split()[0])
            if path:
                return path
    return None


def _cpu_id() -> str:
    # -march=native code must not be reused on another CPU that shares the cache directory: all of
    # /proc/cpuinfo but what changes from moment to moment (x86 "model name"/"flags", arm "Features",
    # "CPU implementer"/"CPU part" are all kept)
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if not line.lower().startswith(("cpu mhz", "bogomips"))}))
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    if not _SOURCE.exists():
        raise RuntimeError(f"the kernel source {_SOURCE} is missing from this installation")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, sysconfig CC, cc, gcc, clang)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C compiler {cc} does not run: {e}") from e
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(_FLAGS).encode(), cc.encode(), version.encode(), _cpu_id().encode(),
                    platform.machine().encode()])
    ).hexdigest()[:24]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mxfx"
    target = cache / f"mx_kernels-{key}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".mx_kernels-", suffix=".so.tmp")
        os.close(fd)
        try:
            result = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                                    timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"compiling {_SOURCE.name} with {cc} failed:\n{result.stderr.strip()}")
            os.replace(tmp, target)  # atomic: a concurrent process sees the old state or a complete file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.mxfx_abi_version.restype = ctypes.c_int64
    if lib.mxfx_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{target} has ABI {lib.mxfx_abi_version()}, expected {_ABI_VERSION}")
    p = ctypes.c_void_p
    for name in ("dual_level_quant_bf16", "dual_level_quant_fp16"):
        fn = getattr(lib, name)
        fn.argtypes = [p, _I64, _I64, _INT, p, p, p, _INT]
        fn.restype = ctypes.c_int
    for name in ("mx_quant_bf16", "mx_quant_fp16"):
        fn = getattr(lib, name)
        fn.argtypes = [p, _I64, _I64, _I64, _INT, _INT, _INT, p, p, _INT]
        fn.restype = ctypes.c_int
    lib.e2m1_encode_f32.argtypes = [p, _I64, _INT, p]
    lib.e2m1_encode_f32.restype = None
    lib.mx_pairs.argtypes = [p, _I64, _I64, _I64, _INT, _INT, _I64, p, p, _I64, _I64, _I64, p, _INT]
    lib.mx_pairs.restype = ctypes.c_int
    lib.mx_matmul.argtypes = [p, p, _I64, _I64, p, _INT, *[_I64] * 5, p, *[_I64] * 4, p, p, *[_I64] * 4, p, _I64,
                              _INT, _INT]
    lib.mx_matmul.restype = ctypes.c_int
    lib.mx_matmul_isa.restype = ctypes.c_int
    return lib


def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (the reason kept in _state["error"]); built at most once."""
    if "lib" not in _state and "error" not in _state:
        with _lock:
            if "lib" not in _state and "error" not in _state:
                try:
                    _state["lib"] = _build()
                except Exception as e:  # noqa: BLE001 - any failure means "not available", reported below
                    _state["error"] = f"{type(e).__name__}: {e}"
    return _state.get("lib")


def available() -> bool:
    """True when the native kernels are built (or can be built now) and loaded."""
    return _library() is not None


def unavailable_reason() -> str | None:
    return None if available() else _state["error"]


def _native_library() -> ctypes.CDLL | None:
    """The library if this call should go native, None for the torch path (warning once in auto mode)."""
    chosen = mode()
    if chosen == "torch":
        return None
    lib = _library()
    if lib is not None:
        return lib
    if chosen == "native":
        raise RuntimeError(f"MXFX_KERNELS=native but the native MX kernels cannot be built: {_state['error']}")
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(
            f"mxfx: native MX kernels unavailable ({_state['error']}); using the much slower torch code. "
            "Install a C compiler (gcc/cc) for the fast path, or set MXFX_KERNELS=torch to silence this.",
            RuntimeWarning,
            stacklevel=4,  # the caller of quantize_mx / quantize_dual_level
        )
    return None


# ------------------------------------------------------------------------------------- running


def _chunks(rows: int, k: int, unit: int = 1) -> int:
    """How many ranges (threads, at most torch.get_num_threads()) a call over `rows` rows of `k` elements
    splits into, each of whole `unit`s and of at least _MIN_PARALLEL_ELEMENTS elements (else one)."""
    return max(1, min(torch.get_num_threads(), -(-rows // unit), rows * k // _MIN_PARALLEL_ELEMENTS))


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"native MX kernel rejected its arguments (rc={rc})")


def _covers(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _native_input(x: torch.Tensor):
    """(library, contiguous x, rows, k, leading shape) when this call goes native, else None."""
    if not _covers(x):
        return None
    lib = _native_library()
    if lib is None:
        return None
    x = x.detach().contiguous()
    k = x.shape[-1]
    return lib, x, x.numel() // k, k, tuple(x.shape[:-1])


def try_quantize_dual_level(x: torch.Tensor, round_mode: str):
    """Native quantize_dual_level if this call should and can go native (arguments already checked),
    else None."""
    if (native := _native_input(x)) is None:
        return None
    lib, x, rows, k, lead = native
    nb0, nb1 = -(-k // 512), -(-k // 32)
    q = torch.empty(lead + (k // 2,), dtype=torch.uint8)
    level0 = torch.empty(lead + (nb0,), dtype=torch.float32)
    level1 = torch.empty(lead + (nb1,), dtype=torch.uint8)
    fn = lib.dual_level_quant_bf16 if x.dtype == torch.bfloat16 else lib.dual_level_quant_fp16
    _check(fn(x.data_ptr(), rows, k, _ROUND_MODES[round_mode], q.data_ptr(), level0.data_ptr(), level1.data_ptr(),
              _chunks(rows, k)))
    return q, level0, level1.view(torch.float8_e8m0fnu)


def try_quantize_mx(x: torch.Tensor, fmt: str, block_size: int, scale_alg: str, round_mode: str):
    """Native quantize_mx if this call should and can go native (arguments already checked), else None."""
    if scale_alg not in _SCALE_ALGS or (native := _native_input(x)) is None:  # unknown scale_alg: torch raises
        return None
    lib, x, rows, k, lead = native
    nb = -(-k // block_size)
    qk = k if fmt == "fp8_e4m3" else k // 2
    q = torch.empty(lead + (qk,), dtype=torch.uint8)
    scale = torch.empty(lead + (nb,), dtype=torch.uint8)
    fn = lib.mx_quant_bf16 if x.dtype == torch.bfloat16 else lib.mx_quant_fp16
    _check(fn(x.data_ptr(), rows, k, block_size, _FORMATS[fmt], _SCALE_ALGS[scale_alg], _ROUND_MODES[round_mode],
              q.data_ptr(), scale.data_ptr(), _chunks(rows, k)))
    if fmt == "fp8_e4m3":
        q = q.view(torch.float8_e4m3fn)
    return q, scale.view(torch.float8_e8m0fnu)


def e2m1_encode_f32(x: torch.Tensor, round_mode: str) -> torch.Tensor:
    """The C E2M1 encoder on fp32 values (a test hook; requires available())."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native MX kernels unavailable: {_state['error']}")
    x = x.detach().float().contiguous().reshape(-1)
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    lib.e2m1_encode_f32(x.data_ptr(), x.numel(), _ROUND_MODES[round_mode], codes.data_ptr())
    return codes


# ------------------------------------------------------------------------------------- matmul

_MATMUL_PATHS = ("auto", "portable")


def matmul_path() -> str:
    """The matmul kernel calls take now: "avx512_bf16" or "portable" (see the module docstring)."""
    chosen = os.environ.get("MXFX_MATMUL", "auto").strip().lower() or "auto"
    if chosen not in _MATMUL_PATHS:
        raise ValueError(f"MXFX_MATMUL must be one of {_MATMUL_PATHS}, got {chosen!r}")
    lib = _library()
    return "avx512_bf16" if chosen == "auto" and lib is not None and lib.mx_matmul_isa() else "portable"


def _readable_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()


def try_mx_matmul(a: torch.Tensor, fmt_a: str, a_scale: torch.Tensor, b: torch.Tensor, fmt_b: str,
                  b_scale: torch.Tensor, k: int, n: int, nz_c0: int | None = None,
                  level0: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """fp32 [M, N] of an MX matmul from packed operands (arguments already checked), or None where the
    call does not go native. a: codes [M, K] (E4M3) or [M, K/2] (packed FP4) bytes; b: the weight's
    bytes, ND [N, K or K/2] (any row stride) or, with nz_c0, the contiguous FRACTAL_NZ storage
    [ceil(Kb/c0), ceil(N/16), 16, c0] of them; a_scale, b_scale: uint8 [M or N, ceil(K/64), 2], any
    strides; level0: (fp32 [M, ceil(K/512)], fp32 [ceil(K/512), N]) for the dual-level matmul."""
    if a.device.type != "cpu" or b.device.type != "cpu":
        return None
    lib = _native_library()
    if lib is None:
        return None
    m, groups = a.shape[0], -(-k // 32)
    fa, fb = _FORMATS[fmt_a], _FORMATS[fmt_b]
    if a.stride(-1) != 1:
        a = a.contiguous()
    vector = int(matmul_path() == "avx512_bf16")
    pairs = torch.empty(m, 16 * groups, dtype=torch.int32)
    sa = torch.empty(m, groups, dtype=torch.float32)
    _check(lib.mx_pairs(a.data_ptr(), m, a.stride(0), k, fa, fb, 16 * groups, pairs.data_ptr(), a_scale.data_ptr(),
                        *a_scale.stride(), sa.data_ptr(), vector))
    if nz_c0 is None:
        if b.stride(-1) != 1:
            b = b.contiguous()
        s_n, s_nb, s_cb, c0 = b.stride(0), 16 * b.stride(0), 0, 1 << 40
    else:
        s_n, s_nb, s_cb, c0 = nz_c0, 16 * nz_c0, b.shape[1] * 16 * nz_c0, nz_c0
    kbytes = k if fmt_b == "fp8_e4m3" else k // 2
    l0a = l0b = None
    if level0 is not None:
        l0a, l0b = (t if t.dtype == torch.float32 else t.float() for t in level0)
        l0a = l0a.contiguous()
        if l0b.stride(-1) != 1:
            l0b = l0b.contiguous()
    out = torch.empty(m, n, dtype=torch.float32)

    _check(lib.mx_matmul(
        pairs.data_ptr(), sa.data_ptr(), m, k, b.data_ptr(), fb, s_n, s_nb, s_cb, c0, kbytes,
        b_scale.data_ptr(), *b_scale.stride(), _readable_bytes(b_scale),
        None if l0a is None else l0a.data_ptr(), None if l0b is None else l0b.data_ptr(),
        0 if l0b is None else l0b.stride(0), 0, n, n, out.data_ptr(), n, vector, _chunks(n, max(m, 1) * k, unit=16)))
    return out

"""A recording stand-in for torch_npu, installed only inside tests (no NPU here).

It defines torch.ops.npu.* with torch_npu's schemas, checks every call against the documented
signatures (dtypes, shapes, contiguity, the FRACTAL_NZ flag; shared/notes/npu_ops.md), records it, and
returns the reference result. As on the device, npu_format_cast keeps the logical shape and marks the
tensor NZ. Like torch_npu 2.13, it registers no fake kernel for npu_dual_level_quant_matmul: mxfx must.
`module()` builds a `torch_npu` module object (an Ascend 950 by default) to put in sys.modules.
"""

import importlib.machinery
import types
import weakref

import torch

import mxfx.ops  # noqa: F401

mx = torch.ops.mxfx
OPS = ("npu_dynamic_dual_level_mx_quant", "npu_dual_level_quant_matmul", "npu_dynamic_mx_quant",
       "npu_quant_matmul", "npu_format_cast", "npu_convert_weight_to_int4pack", "npu_weight_quant_batchmatmul",
       "npu_rms_norm_dynamic_mx_quant", "npu_add_rms_norm_dynamic_mx_quant", "npu_swiglu_mx_quant", "npu_rotate_quant")
E8M0, E4M3, FP4, NZ = 293, 292, 296, 29

calls: list[tuple[str, dict]] = []
_nz: dict[int, weakref.ref] = {}  # id -> tensor marked FRACTAL_NZ (tensors compare elementwise: no WeakSet)
_library: list = []


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"torch_npu stand-in: {message}")


def _marked(t: torch.Tensor | None) -> bool:
    return t is not None and id(t) in _nz and _nz[id(t)]() is t


def _is_nz(t: torch.Tensor) -> bool:
    return _marked(t) or _marked(t._base)


def _dual_level_quant(input, *, smooth_scale=None, round_mode="rint"):
    _check(input.dtype in (torch.bfloat16, torch.float16) and 1 <= input.dim() <= 7,
           f"input {input.dtype} {input.dim()}-D")
    _check(input.numel() > 0 and input.shape[-1] % 2 == 0, f"input shape {list(input.shape)}")
    calls.append(("npu_dynamic_dual_level_mx_quant", {"input": tuple(input.shape), "round_mode": round_mode}))
    return mx.npu_dynamic_dual_level_mx_quant(input, smooth_scale=smooth_scale, round_mode=round_mode)


def _mx_quant(input, *, axis=-1, round_mode="rint", dst_type=FP4, block_size=32, scale_alg=0, dst_type_max=0.0,
              max_low_bound=0.0):
    _check(input.dtype in (torch.bfloat16, torch.float16, torch.float32), f"input {input.dtype}")
    _check(isinstance(dst_type, int) and dst_type in (E4M3, FP4), f"dst_type {dst_type!r} (an int: 292 or 296)")
    calls.append(("npu_dynamic_mx_quant",
                  {"input": tuple(input.shape), "dst_type": dst_type, "round_mode": round_mode}))
    return mx.npu_dynamic_mx_quant(input, axis=axis, round_mode=round_mode, dst_type=dst_type,
                                   block_size=block_size, scale_alg=scale_alg)


def _rotate_quant(x, rotation, *, alpha=None, dst_dtype=None, axis=-1, round_mode="rint", scale_alg=0,
                  dst_type_max=0.0, transpose_y=False):
    k = rotation.shape[-1]
    _check(x.dtype in (torch.bfloat16, torch.float16) and rotation.dtype == x.dtype and 1 <= x.dim() <= 7,
           f"x {x.dtype} {x.dim()}-D, rotation {rotation.dtype}")
    _check(k in (32, 64, 128) and x.shape[-1] % k == 0
           and tuple(rotation.shape) in ((k, k), (x.shape[-1] // k, k, k)), f"rotation {list(rotation.shape)}")
    _check(isinstance(dst_dtype, int) and dst_dtype in (E4M3, FP4), f"dst_dtype {dst_dtype!r} (an int: 292 or 296)")
    _check(alpha is None and not transpose_y and axis in (-1, x.dim() - 1), "alpha / transpose_y / axis")
    calls.append(("npu_rotate_quant", {"x": tuple(x.shape), "rotation": tuple(rotation.shape), "dst_dtype": dst_dtype,
                                       "round_mode": round_mode, "scale_alg": scale_alg}))
    return mx.npu_rotate_quant(x, rotation, dst_dtype=dst_dtype, round_mode=round_mode, scale_alg=scale_alg,
                               dst_type_max=dst_type_max)


def _format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
    _check(acl_format == NZ and self.dim() == 2 and self.is_contiguous(), f"cast to {acl_format} of {list(self.shape)}")
    if customize_dtype is None:  # the dual-level weight: int8 [N, K/2]
        _check(self.dtype == torch.int8 and input_dtype is None, f"plain NZ cast of {self.dtype}")
    else:  # the A8W4 weight: packed FP4 bytes, cast with the FP8 container type
        _check(self.dtype == torch.uint8 and (customize_dtype, input_dtype) == (E4M3, FP4),
               f"FP4 NZ cast with customize_dtype={customize_dtype}, input_dtype={input_dtype}")
    calls.append(("npu_format_cast", {"self": (self.dtype, tuple(self.shape)), "customize_dtype": customize_dtype}))
    out = self.clone()  # the logical shape stays; the storage format is what changes on a device
    _nz[id(out)] = weakref.ref(out)
    return out


def _dual_level_matmul(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale, *, bias=None,
                       output_dtype=15):
    m, k, n = x1.shape[0], 2 * x1.shape[1], x2.shape[0]
    _check(x1.dim() == 2 and x2.dim() == 2 and x1.dtype in (torch.int8, torch.uint8), "x1/x2 must be 2-D")
    _check(x2.dtype == torch.int8 and _is_nz(x2) and x2.shape[1] * 2 == k, "x2 must be the NZ int8 [N, K/2] weight")
    g0, pairs = -(-k // 512), -(-k // 64)
    for name, t, shape in (("x1_level0_scale", x1_level0_scale, (m, g0)), ("x2_level0_scale", x2_level0_scale, (g0, n)),
                           ("x1_level1_scale", x1_level1_scale, (m, pairs, 2)),
                           ("x2_level1_scale", x2_level1_scale, (n, pairs, 2))):
        _check(tuple(t.shape) == shape and t.is_contiguous(),
               f"{name} {list(t.shape)}, expected contiguous {list(shape)}")
    _check(bias is None or (bias.dtype == torch.float32 and tuple(bias.shape) == (n,)), "bias must be fp32 [N]")
    _check(output_dtype in (15, 5), f"output_dtype {output_dtype!r}")
    calls.append(("npu_dual_level_quant_matmul",
                  {"x1": tuple(x1.shape), "x2": tuple(x2.shape), "bias": bias is not None}))
    return mx.npu_dual_level_quant_matmul(x1, mx.npu_format_cast(x2, NZ), x1_level0_scale, x2_level0_scale,
                                          x1_level1_scale, x2_level1_scale, bias=bias, output_dtype=output_dtype)


def _quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, x1_dtype=None,
                  x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None, y_scale=None):
    fp4, w4a4 = x2_dtype == FP4, x1_dtype == FP4
    _check(scale_dtype == E8M0 and pertoken_scale_dtype == E8M0, "scale dtypes must be 293 (float8_e8m0fnu)")
    _check(list(group_sizes) == ([0, 0, 32] if fp4 and not w4a4 else [1, 1, 32]), f"group_sizes {group_sizes}")
    _check(not x2.is_contiguous() and x2._base is not None, "x2 must be the transposed view of the [N, K] weight")
    _check(not scale.is_contiguous(), "scale must be the [K/64, N, 2] view of [N, K/64, 2]")
    if w4a4:  # vllm-ascend W4A4_MXFP4 with NZ off: FP4 x FP4, the weight's plain transposed view
        _check(fp4 and x1.dtype == torch.uint8 and x2.dtype == torch.uint8 and not _is_nz(x2), "W4A4 operands")
        _check(bias is None or bias.dtype == torch.float32, "W4A4 bias must be fp32")
    elif fp4:
        _check(x2.dtype == torch.uint8 and _is_nz(x2), "the FP4 weight must be NZ-cast before the transpose")
        out_dtype = {15: torch.bfloat16, 5: torch.float16}[output_dtype]
        _check(bias is None or (bias.dtype == out_dtype and bias.shape == (1, x2.shape[1])),
               "A8W4 bias must be [1, N] in the output dtype")
    else:
        _check(x2.dtype == torch.float8_e4m3fn and (bias is None or bias.dtype == torch.float32), "MXFP8 weight / bias")
    calls.append(("npu_quant_matmul", {"x1": tuple(x1.shape), "x2": tuple(x2.shape), "group_sizes": list(group_sizes)}))
    return mx.npu_quant_matmul(x1, x2, scale, pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype,
                               x1_dtype=x1_dtype, x2_dtype=x2_dtype, pertoken_scale_dtype=pertoken_scale_dtype,
                               scale_dtype=scale_dtype,
                               group_sizes=group_sizes)


def _int4pack(weight, inner_k_tiles=0):
    _check(weight.dtype == torch.int32 and weight.dim() == 2 and weight.shape[1] % 8 == 0,
           f"int4pack takes int32 [k, n], n % 8 == 0, got {weight.dtype} {list(weight.shape)}")
    calls.append(("npu_convert_weight_to_int4pack", {"weight": tuple(weight.shape)}))
    return mx.npu_convert_weight_to_int4pack(weight, inner_k_tiles)


def _weight_quant_matmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
                         bias=None, antiquant_group_size=0, inner_precise=0, weight_dtype=None):
    k, n = x.shape[-1], weight.shape[1] * 8
    _check(x.dtype in (torch.bfloat16, torch.float16), f"x {x.dtype}")
    _check(weight.dtype == torch.int32 and weight.is_contiguous() and weight.shape[0] == k, "weight: int4pack [K, N/8]")
    group = antiquant_group_size
    _check(antiquant_scale.dtype == x.dtype, "antiquant_scale must be in x's dtype")
    _check(group == 0 or (group % 32 == 0 and 32 <= group < k), f"antiquant_group_size {group}")
    _check(tuple(antiquant_scale.shape) == ((-(-k // group), n) if group else (n,)),
           f"antiquant_scale {list(antiquant_scale.shape)}")
    _check(bias is None or bias.dtype == (torch.float32 if x.dtype == torch.bfloat16 else torch.float16), "bias dtype")
    calls.append(("npu_weight_quant_batchmatmul", {"x": tuple(x.shape), "weight": tuple(weight.shape), "group": group}))
    return mx.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, bias=bias,
                                           antiquant_group_size=group)


def _check_norm(x, gamma, dst_type, scale_alg):
    _check(x.dtype in (torch.bfloat16, torch.float16) and 1 <= x.dim() <= 7, f"x {x.dtype} {x.dim()}-D")
    _check(gamma.dim() == 1 and gamma.shape[0] == x.shape[-1] and gamma.dtype in (x.dtype, torch.float32),
           f"gamma {gamma.dtype} {list(gamma.shape)}")
    _check(isinstance(dst_type, int) and dst_type in (E4M3, FP4), f"dst_type {dst_type!r} (an int: 292 or 296)")
    _check(scale_alg in (0, 1) and (scale_alg == 0 or dst_type == E4M3), f"scale_alg {scale_alg} for {dst_type}")


def _rms_norm_quant(x, gamma, *, beta=None, epsilon=1e-6, scale_alg=0, round_mode="rint", dst_type=FP4):
    _check_norm(x, gamma, dst_type, scale_alg)
    calls.append(("npu_rms_norm_dynamic_mx_quant", {"x": tuple(x.shape), "epsilon": epsilon, "dst_type": dst_type}))
    return mx.npu_rms_norm_dynamic_mx_quant(x, gamma, beta=beta, epsilon=epsilon, scale_alg=scale_alg,
                                            round_mode=round_mode, dst_type=dst_type)


def _add_rms_norm_quant(x1, x2, gamma, *, beta=None, epsilon=1e-6, scale_alg=0, round_mode="rint", dst_type=FP4):
    _check_norm(x1, gamma, dst_type, scale_alg)
    _check(x1.shape == x2.shape and x1.dtype == x2.dtype, "x1 and x2 must match")
    calls.append(("npu_add_rms_norm_dynamic_mx_quant",
                  {"x1": tuple(x1.shape), "epsilon": epsilon, "dst_type": dst_type}))
    return mx.npu_add_rms_norm_dynamic_mx_quant(x1, x2, gamma, beta=beta, epsilon=epsilon, scale_alg=scale_alg,
                                                round_mode=round_mode, dst_type=dst_type)


def _swiglu_quant(x, *, group_index=None, activate_dim=-1, activate_left=False, swiglu_mode=0, clamp_limit=7.0,
                  glu_alpha=1.702, glu_bias=1.0, group_mode=0, axis=-1, dst_type=FP4, round_mode="rint", scale_alg=0,
                  max_dtype_value=0.0):
    _check(x.dtype in (torch.bfloat16, torch.float16) and x.dim() >= 2 and x.shape[activate_dim] % 2 == 0,
           f"x {x.dtype} {list(x.shape)}")
    _check(isinstance(dst_type, int) and dst_type in (E4M3, FP4), f"dst_type {dst_type!r} (an int: 292 or 296)")
    calls.append(("npu_swiglu_mx_quant", {"x": tuple(x.shape), "activate_left": activate_left, "dst_type": dst_type}))
    return mx.npu_swiglu_mx_quant(x, group_index=group_index, activate_dim=activate_dim, activate_left=activate_left,
                                  swiglu_mode=swiglu_mode, axis=axis, dst_type=dst_type, round_mode=round_mode,
                                  scale_alg=scale_alg, max_dtype_value=max_dtype_value)


_KERNELS = {"npu_dynamic_dual_level_mx_quant": _dual_level_quant, "npu_dynamic_mx_quant": _mx_quant,
            "npu_format_cast": _format_cast, "npu_dual_level_quant_matmul": _dual_level_matmul,
            "npu_quant_matmul": _quant_matmul, "npu_convert_weight_to_int4pack": _int4pack,
            "npu_weight_quant_batchmatmul": _weight_quant_matmul, "npu_rms_norm_dynamic_mx_quant": _rms_norm_quant,
            "npu_add_rms_norm_dynamic_mx_quant": _add_rms_norm_quant, "npu_swiglu_mx_quant": _swiglu_quant,
            "npu_rotate_quant": _rotate_quant}


def _format_cast_fake(self, acl_format, *, customize_dtype=None, input_dtype=None):
    return self.new_empty(self.shape)


def register() -> None:
    """Define torch.ops.npu.* once per process (a torch.library definition cannot be taken back)."""
    if _library:
        return
    library = torch.library.Library("npu", "FRAGMENT")
    for name in OPS:
        library.define(str(getattr(torch.ops.mxfx, name).default._schema).removeprefix("mxfx::"))
        library.impl(name, _KERNELS[name], "CPU")
        if name == "npu_format_cast":
            torch.library.register_fake(f"npu::{name}", _format_cast_fake, lib=library)
        elif name != "npu_dual_level_quant_matmul":  # torch_npu's meta registrations: same as the mirrors'
            torch.library.register_fake(f"npu::{name}", getattr(torch.ops.mxfx, name).default, lib=library)
    _library.append(library)


def module(soc_version: int = 260, device_name: str = "Ascend950PR_9579", devices: bool = True) -> types.ModuleType:
    """A `torch_npu` module object for sys.modules: the ops above plus torch_npu.npu's device queries."""
    register()
    torch_npu = types.ModuleType("torch_npu")
    torch_npu.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    torch_npu.npu = types.SimpleNamespace(is_available=lambda: devices, get_soc_version=lambda: soc_version,
                                          get_device_name=lambda: device_name)
    for name in OPS:
        setattr(torch_npu, name, getattr(torch.ops.npu, name))
    torch_npu.float4_e2m1fn_x2, torch_npu.float8_e8m0fnu = FP4, E8M0
    return torch_npu

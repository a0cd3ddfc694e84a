"""What mxfx adds to torch_npu, installed when a compile first targets the NPU (never by `import mxfx`):

- a fake (meta) kernel for npu::npu_dual_level_quant_matmul, which torch_npu lacks (the op is documented
  as eager-only), so that Dynamo and aot can trace graphs that call it;
- a torchair GE converter for it, to the Ascend IR DualLevelQuantBatchMatmul (torchair has none), when
  torchair imports;
- the Ascend 950 check: the MX operators exist on A5 only.

Facts from torch_npu @ 9e73e708 and op-plugin @ 517f2e7d: the dtype arguments are ints (bf16 15, fp16 5;
torch_npu's own dtypes are ACL + 256: float8_e8m0fnu 293, float4_e2m1fn_x2 296); SocVersion Ascend950
is 260 (torch_npu.npu.get_soc_version()); installing torch_npu makes `import torch` import it unless
TORCH_DEVICE_BACKEND_AUTOLOAD=0.
"""

import functools
import importlib.util

import torch

from .dtypes import from_scalar_type

ASCEND950 = 260
DUAL_LEVEL_MATMUL = "npu::npu_dual_level_quant_matmul"


def torch_npu_available() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def npu_visible() -> bool:
    """torch_npu is installed and sees an NPU (importing torch_npu only when it is installed)."""
    return torch_npu_available() and require_torch_npu().npu.is_available()


def require_torch_npu():
    if not torch_npu_available():
        raise RuntimeError("target 'npu' needs torch_npu (pip install 'mxfx[npu]' on an Ascend machine)")
    import torch_npu

    return torch_npu


def soc_check(soc_version: int, device_name: str) -> str | None:
    """None on an Ascend 950 or later, else why the MX operators cannot run there."""
    if soc_version >= ASCEND950:
        return None
    return (f"NPU {device_name!r} (SoC version {soc_version}) predates Ascend 950: the MX quantization and "
            "quant-matmul operators run on Ascend 950 (A5) only")


def device_problem() -> str | None:
    """Why this machine's NPU cannot run mxfx's NPU target, or None."""
    npu = require_torch_npu().npu
    if not npu.is_available():
        return "torch_npu is installed but no NPU is visible"
    return soc_check(npu.get_soc_version(), npu.get_device_name())


def dual_level_matmul_fake(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale,
                           *, bias=None, output_dtype=15):
    """x1 [M, K/2] and x2 [N, K/2] (its NZ layout is a storage property) give [M, N] in output_dtype."""
    return x1.new_empty((x1.shape[0], x2.shape[0]), dtype=from_scalar_type(output_dtype))


def register_dual_level_matmul_fake() -> bool:
    """Register the fake kernel unless torch_npu already has one; True if mxfx registered it."""
    if torch._C._dispatch_has_kernel_for_dispatch_key(DUAL_LEVEL_MATMUL, "Meta"):
        return False
    entry = torch._library.simple_registry.singleton.find(DUAL_LEVEL_MATMUL)
    if entry.fake_impl.kernel is not None:
        return False
    torch.library.register_fake(DUAL_LEVEL_MATMUL)(dual_level_matmul_fake)
    return True


# -- the GE converter ---------------------------------------------------------------------------------------
def dual_level_matmul_ir(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale,
                         bias=None, output_dtype=15) -> tuple[dict, dict]:
    """torch_npu's arguments as DualLevelQuantBatchMatmul's inputs, in the IR's order (x1, x2, x1_level0,
    x1_level1, x2_level0, x2_level1, bias: the level-1 scales follow their own operand's level-0 scale,
    unlike torch_npu's l0, l0, l1, l1), and its attributes (ops-nn dual_level_quant_batch_matmul_proto.h)."""
    inputs = {
        "x1": x1, "x2": x2,
        "x1_level0_scale": x1_level0_scale, "x1_level1_scale": x1_level1_scale,
        "x2_level0_scale": x2_level0_scale, "x2_level1_scale": x2_level1_scale,
        "bias": bias,
    }
    attrs = {"dtype": output_dtype, "transpose_x1": False, "transpose_x2": True,
             "level0_group_size": 512, "level1_group_size": 32}
    return inputs, attrs


@functools.cache
def register_ge_converter() -> bool:
    """Register the converter with torchair (once); False when torchair does not import.

    Unverified without an Ascend 950 (examples/npu_smoke.py exercises it): the FP4 bitcasts follow
    torchair's own npu_quant_matmul MXFP4 converter; whether GE inserts a TransData for the NZ weight
    is to be checked with a graph dump.
    """
    try:
        import torchair
        from torchair._ge_concrete_graph import ge_apis as ge
        from torchair.ge import DataType, attr
        from torchair.ge._ge_graph import torch_dtype_value_to_ge_proto_type, torch_dtype_value_to_ge_type
    except ImportError:
        return False

    def fp4_from_bytes(t):  # uint8 [M, K/2] -> FP4 [M, K]
        shape = ge.Mul(ge.Shape(t), ge.Const([1] * (t.rank - 1) + [2]))
        return ge.Reshape(ge.Bitcast(t, type=DataType.DT_FLOAT4_E2M1), shape)

    def e8m0(t):
        return ge.Bitcast(t, type=DataType.DT_FLOAT8_E8M0)

    @torchair.register_fx_node_ge_converter(torch.ops.npu.npu_dual_level_quant_matmul.default)
    def convert(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale, *, bias=None,
                output_dtype=15, meta_outputs=None):
        inputs, attrs = dual_level_matmul_ir(
            fp4_from_bytes(x1), ge.Bitcast(x2, type=DataType.DT_FLOAT4_E2M1, keep_dim=True), x1_level0_scale,
            x2_level0_scale, e8m0(x1_level1_scale), e8m0(x2_level1_scale), bias, output_dtype)
        ge_attrs = {"dtype": attr.Int(torch_dtype_value_to_ge_type(attrs["dtype"]))}
        ge_attrs.update({k: attr.Bool(v) for k, v in attrs.items() if isinstance(v, bool)})
        ge_attrs.update({k: attr.Int(v) for k, v in attrs.items() if k.endswith("group_size")})
        y = torchair.ge.custom_op("DualLevelQuantBatchMatmul", inputs=inputs, outputs=["y"], attrs=ge_attrs)
        y.desc.dtype = torch_dtype_value_to_ge_proto_type(output_dtype)
        return y

    return True


def install() -> None:
    """Everything the NPU target needs, checked: torch_npu, an Ascend 950, the fake kernel, the converter."""
    require_torch_npu()
    if (problem := device_problem()) is not None:
        raise RuntimeError(f"mxfx target 'npu': {problem}")
    register_dual_level_matmul_fake()
    register_ge_converter()

"""The serving clients' MX linear methods, replayed call for call against a torch_npu stand-in that
forwards to torch.ops.mxfx, and compared bit for bit with mxfx's scheme of the same rule.

Each replay was written from a reading of the client's source (no client code is copied here):

- vllm-project/vllm-ascend at 182b75ea84ff13ece27b57391331ef8935410aea (the newest snapshot that could be
  fetched), `vllm_ascend/quantization/methods/{w8a8_mxfp8,w4a8_mxfp4,w4a4_mxfp4}.py`, and the same classes in
  the later split layout the code index holds: `methods/w8a8/w8a8_mxfp8.py` @ 065674f54b2cbd864029cd437fd65dba2b06a352,
  `methods/w4a8/w4a8_mxfp4.py` @ 04eb18325079dbbf49c64a2466638506ab95aff4, `methods/w4a4/w4a4_mxfp4.py` @
  0dfe844909ff475da9b277e2f4efdc1557c91485 (the linear methods' process_weights_after_loading and apply are the
  same in both, except W4A4_MXFP4's NZ branch, which exists only in the split layout).
- sgl-project/sglang `python/sglang/srt/hardware_backend/npu/quantization/linear_method_npu.py`, the version
  with NPUMXFP8LinearMethod, NPUMXFP4W4A8LinearMethod, NPUMXFP4W4A8OfflineLinearMethod,
  NPUSingleLevelMXFP4LinearMethod(+Offline) and NPUDualLevelMXFP4LinearMethod (code-index file id 59295385793;
  the index does not give its commit, and the 1.2 GB repository was too large to fetch).

The stand-in (`NPU` below) has exactly the functions the clients call. Its dtype attributes are what
torch_npu defines: `torch_npu.float8_e8m0fnu` is the int 293 and `torch_npu.float4_e2m1fn_x2` the int 296
(torch_npu's own codes, 256 + aclDataType; sglang's linear_method_npu.py says so when it takes FP4 from
torch_npu rather than torch). The clients' other dtype arguments are torch dtypes (torch.float8_e4m3fn,
torch.bfloat16, and sglang's scale_dtype=torch.float8_e8m0fnu), passed through unchanged. npu_format_cast
returns the reference's emulated FRACTAL_NZ tensor, which is what the mirrored matmuls read. vllm-ascend's
W4A4_MXFP4 is replayed with NZ off (`_should_trans_nz` false: the only branch in the fetched snapshot) and,
separately, with NZ on (the split layout's branch).
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mxfx
from mxfx.checkpoint.stored import TYPES
from mxfx.schemes import MXFP4, MXFP4W4A8, MXFP8, SCHEMES, DualLevelMXFP4
from mxfx.targets import TARGETS

REF = TARGETS["reference"]
mx = torch.ops.mxfx
K, N, M = 512, 256, 5


def standin(calls: list):
    """A `torch_npu` with the functions the clients call, each forwarding its arguments unchanged to
    torch.ops.mxfx and recording (name, keyword names) in `calls`."""

    def forward(name):
        op = getattr(mx, name)

        def call(*args, **kwargs):
            calls.append((name, tuple(sorted(kwargs))))
            return op(*args, **kwargs)
        return call

    names = ("npu_dynamic_mx_quant", "npu_quant_matmul", "npu_format_cast", "npu_dynamic_dual_level_mx_quant",
             "npu_dual_level_quant_matmul")
    return SimpleNamespace(**{n: forward(n) for n in names}, float8_e8m0fnu=293, float4_e2m1fn_x2=296)


def inputs(k=K, n=N, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(2, M, k, generator=g).to(torch.bfloat16)
    x[0, 1, :64] *= 40  # one outlier row: its blocks get other exponents than the rest
    b = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    return weight, x, b


def layer(**tensors):
    """The client's layer: attributes with `.data`, as vllm's Parameters are reassigned."""
    return SimpleNamespace(**{name: torch.nn.Parameter(t, requires_grad=False) for name, t in tensors.items()})


def stored(type_name: str, scheme, weight):
    """The checkpoint tensors msmodelslim's type holds for `weight`, made by mxfx's quantizer of that scheme
    (W8A8_MXFP8: float8_e4m3fn [N, K] + uint8 [N, K/32]; W4A8_MXFP / W4A4_MXFP4: uint8 [N, K/2] + uint8 [N, K/32])."""
    return TYPES[type_name].from_codes(scheme.quantize_weight(REF, weight), weight.shape[1])


def mxfx_linear(scheme, weight, x, bias):
    return scheme.linear(REF, x, scheme.prepare(REF, weight, bias, x.dtype))


def compiled_linear(scheme_name, weight, x, bias):
    """mxfx's compiled graph of the same nn.Linear on the reference target."""
    torch._dynamo.reset()
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        out = torch.compile(linear, backend=mxfx.backend(scheme_name, target="reference"), fullgraph=True)(x)
    torch._dynamo.reset()
    return out


# --- vllm-ascend ------------------------------------------------------------------------------------------

def vllm_w8a8_mxfp8(npu, weight, weight_scale, x, bias, scale_alg=0):
    """AscendW8A8MXFP8DynamicLinearMethod: process_weights_after_loading, then apply."""
    lyr = layer(weight=weight, weight_scale=weight_scale)
    n_dim, k_dim = lyr.weight_scale.data.shape
    scale = lyr.weight_scale.data
    if k_dim % 2:
        scale = F.pad(scale, (0, 1), value=0).reshape(n_dim, k_dim // 2 + 1, 2)
    else:
        scale = scale.reshape(n_dim, k_dim // 2, 2)
    lyr.weight.data = lyr.weight.data.transpose(0, 1).contiguous()  # the persistent [K, N] buffer
    lyr.weight_scale.data = scale.transpose(0, 1).contiguous()  # [K/64, N, 2]

    shape = x.shape
    x = x.view(-1, x.shape[-1]) if x.dim() > 2 else x
    qx, pertoken = npu.npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn, scale_alg=scale_alg)
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.to(torch.float32)
    out = npu.npu_quant_matmul(qx, lyr.weight, lyr.weight_scale, scale_dtype=npu.float8_e8m0fnu,
                               pertoken_scale=pertoken, pertoken_scale_dtype=npu.float8_e8m0fnu, bias=bias,
                               output_dtype=x.dtype, group_sizes=[1, 1, 32])
    return out.view(*shape[:-1], -1) if len(shape) > 2 else out


def vllm_w4a8_mxfp(npu, weight, weight_scale, x, bias):
    """AscendW4A8MXFPDynamicLinearMethod (apply takes x as given: a 2-D activation)."""
    lyr = layer(weight=weight, weight_scale=weight_scale)
    lyr.weight.data = npu.npu_format_cast(lyr.weight.data, 29, customize_dtype=torch.float8_e4m3fn,
                                          input_dtype=npu.float4_e2m1fn_x2)
    lyr.weight.data = lyr.weight.data.transpose(-1, -2)
    n, k = lyr.weight_scale.shape
    lyr.weight_scale.data = lyr.weight_scale.data.reshape(n, k // 2, 2).transpose(-3, -2)

    qx, scale = npu.npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn)
    return npu.npu_quant_matmul(qx, lyr.weight, lyr.weight_scale, scale_dtype=npu.float8_e8m0fnu,
                                pertoken_scale=scale, pertoken_scale_dtype=npu.float8_e8m0fnu, bias=bias,
                                output_dtype=x.dtype, x2_dtype=npu.float4_e2m1fn_x2, group_sizes=[0, 0, 32])


def vllm_w4a4_mxfp4(npu, weight, weight_scale, x, bias, nz=False):
    """AscendW4A4MXFP4DynamicLinearMethod, a non-RowParallel layer (no TP padding)."""
    lyr = layer(weight=weight, weight_scale=weight_scale)
    n_dim, k_dim = lyr.weight_scale.data.shape
    if k_dim % 2:
        lyr.weight_scale.data = F.pad(lyr.weight_scale.data, (0, 1), value=0).reshape(n_dim, k_dim // 2 + 1, 2)
    else:
        lyr.weight_scale.data = lyr.weight_scale.data.reshape(n_dim, k_dim // 2, 2)
    if nz:  # the split layout's _should_trans_nz branch: contiguous [K/2, N], then the FP4 NZ cast
        lyr.weight.data = lyr.weight.data.transpose(0, 1).contiguous()
        lyr.weight_scale.data = lyr.weight_scale.data.transpose(0, 1).contiguous()
        lyr.weight.data = npu.npu_format_cast(lyr.weight.data, 29, customize_dtype=torch.float8_e4m3fn,
                                              input_dtype=npu.float4_e2m1fn_x2)
    else:
        lyr.weight.data = lyr.weight.data.transpose(0, 1)
        lyr.weight_scale.data = lyr.weight_scale.data.transpose(0, 1)

    shape = x.shape
    x = x.view(-1, x.shape[-1]) if x.dim() > 2 else x
    qx, scale = npu.npu_dynamic_mx_quant(x, dst_type=npu.float4_e2m1fn_x2, round_mode="round")
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.to(torch.float32)
    out = npu.npu_quant_matmul(qx, lyr.weight, lyr.weight_scale, scale_dtype=npu.float8_e8m0fnu,
                               pertoken_scale=scale, pertoken_scale_dtype=npu.float8_e8m0fnu, bias=bias,
                               output_dtype=x.dtype, x1_dtype=npu.float4_e2m1fn_x2, x2_dtype=npu.float4_e2m1fn_x2,
                               group_sizes=[1, 1, 32])
    return out.view(*shape[:-1], -1) if len(shape) > 2 else out


# --- sglang -------------------------------------------------------------------------------------------------

E8M0 = torch.float8_e8m0fnu  # sglang's _get_float8_e8m0fnu_dtype(): the torch dtype


def sglang_mxfp8(npu, x, bias, weight=None, stored_weight=None, weight_scale=None):
    """NPUMXFP8LinearMethod: online (bf16 weight) or offline (ModelSlim float8_e4m3fn + uint8 scale)."""
    if stored_weight is not None:
        n_dim, k_dim = weight_scale.shape
        w = stored_weight.transpose(0, 1)
        w_scale = weight_scale.reshape(n_dim, k_dim // 2, 2).transpose(0, 1)
    else:
        qw, scale = npu.npu_dynamic_mx_quant(weight, dst_type=torch.float8_e4m3fn)
        w, w_scale = qw.transpose(0, 1), scale.transpose(0, 1)
    bias_fp32 = None if bias is None else bias.to(torch.float32)

    x2d = x.reshape(-1, x.shape[-1])
    qx, scale = npu.npu_dynamic_mx_quant(x2d, dst_type=torch.float8_e4m3fn)
    out = npu.npu_quant_matmul(qx, w, w_scale, scale_dtype=E8M0, pertoken_scale=scale, pertoken_scale_dtype=E8M0,
                               bias=bias_fp32, output_dtype=x.dtype, group_sizes=[1, 1, 32])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def sglang_w4a8(npu, x, bias, weight=None, stored_weight=None, weight_scale=None):
    """NPUMXFP4W4A8LinearMethod (online: weights quantized with round_mode="round") or
    NPUMXFP4W4A8OfflineLinearMethod (ModelSlim W4A8_MXFP); one apply, the bias in fp32."""
    fp4 = npu.float4_e2m1fn_x2
    if stored_weight is not None:
        w = npu.npu_format_cast(stored_weight, 29, customize_dtype=torch.float8_e4m3fn, input_dtype=fp4)
        n, k = weight_scale.shape
        w_scale = weight_scale.reshape(n, k // 2, 2).transpose(-3, -2)
    else:
        qw, scale = npu.npu_dynamic_mx_quant(weight, dst_type=fp4, round_mode="round")
        w = npu.npu_format_cast(qw.view(torch.uint8), 29, customize_dtype=torch.float8_e4m3fn, input_dtype=fp4)
        w_scale = scale.transpose(-3, -2)
    w = w.transpose(-1, -2)

    x2d = x.reshape(-1, x.shape[-1])
    qx, scale = npu.npu_dynamic_mx_quant(x2d, dst_type=torch.float8_e4m3fn)
    out = npu.npu_quant_matmul(qx, w, w_scale, scale_dtype=E8M0, pertoken_scale=scale, pertoken_scale_dtype=E8M0,
                               bias=None if bias is None else bias.to(torch.float32), output_dtype=x.dtype,
                               x2_dtype=fp4, group_sizes=[0, 0, 32])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def sglang_w4a4(npu, x, bias, weight=None, stored_weight=None, weight_scale=None):
    """NPUSingleLevelMXFP4LinearMethod (online: weights round_mode="round") or its Offline subclass
    (ModelSlim W4A4_MXFP4); activations round_mode="round", FP4 x FP4."""
    fp4 = npu.float4_e2m1fn_x2
    if stored_weight is not None:
        w = stored_weight.transpose(0, 1)
        n_dim, k_dim = weight_scale.shape
        w_scale = weight_scale.reshape(n_dim, k_dim // 2, 2).transpose(0, 1)
    else:
        qw, scale = npu.npu_dynamic_mx_quant(weight, dst_type=fp4, round_mode="round")
        w, w_scale = qw.transpose(0, 1), scale.transpose(-3, -2)

    x2d = x.reshape(-1, x.shape[-1])
    qx, scale = npu.npu_dynamic_mx_quant(x2d, dst_type=fp4, round_mode="round")
    out = npu.npu_quant_matmul(qx, w, w_scale, scale_dtype=E8M0, pertoken_scale=scale, pertoken_scale_dtype=E8M0,
                               bias=None if bias is None else bias.to(torch.float32), output_dtype=x.dtype,
                               x1_dtype=fp4, x2_dtype=fp4, group_sizes=[1, 1, 32])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def sglang_dual_level(npu, weight, x, bias):
    """NPUDualLevelMXFP4LinearMethod (online dual-level W4A4)."""
    qw, w_l0, w_l1 = npu.npu_dynamic_dual_level_mx_quant(weight, smooth_scale=None)
    qw_nz = npu.npu_format_cast(qw.view(torch.int8), 29, customize_dtype=torch.int8)
    w_l0 = w_l0.squeeze(-1).transpose(0, 1).contiguous()  # expects [N, K/512, 1] from the quantizer

    x2d = x.reshape(-1, x.shape[-1])
    qx, a_l0, a_l1 = npu.npu_dynamic_dual_level_mx_quant(x2d, smooth_scale=None)
    out = npu.npu_dual_level_quant_matmul(qx, qw_nz, a_l0, w_l0, a_l1, w_l1,
                                          bias=None if bias is None else bias.to(torch.float32), output_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


# --- the tests ----------------------------------------------------------------------------------------------

def test_vllm_ascend_w8a8_mxfp8_equals_mxfx_mxfp8_compiled():
    """vllm-ascend W8A8_MXFP8 linear (w8a8_mxfp8.py, both layouts): checkpoint float8_e4m3fn [N, K] +
    uint8 [N, K/32], weight made a contiguous [K, N] buffer, scale a contiguous [K/64, N, 2]; activation
    npu_dynamic_mx_quant(E4M3, scale_alg=0 off MiniMax M3), bias fp32, group_sizes [1, 1, 32]. Same rule
    as mxfx mxfp8 (only the weight's storage order differs: mxfx keeps the [K, N] view)."""
    weight, x, bias = inputs()
    calls = []
    t = stored("W8A8_MXFP8", SCHEMES["mxfp8"], weight)
    assert t["weight"].dtype == torch.float8_e4m3fn and t["weight_scale"].shape == (N, K // 32)
    out = vllm_w8a8_mxfp8(standin(calls), t["weight"], t["weight_scale"], x, bias)
    assert torch.equal(out, compiled_linear("mxfp8", weight, x, bias))
    assert [c[0] for c in calls] == ["npu_dynamic_mx_quant", "npu_quant_matmul"]


def test_vllm_ascend_w8a8_mxfp8_minimax_scale_alg_1_equals_hand_composed_mxfx_ops():
    """vllm-ascend W8A8_MXFP8 with get_dynamic_mx_quant_scale_alg() == 1 (MiniMax M3 on A5): activation
    scales by RCEIL. mxfx's MXFP8 scheme has no activation scale_alg parameter (it always uses 0), so this is
    compared with mxfx ops composed by hand on mxfx mxfp8's prepared weights."""
    weight, x, bias = inputs()
    t = stored("W8A8_MXFP8", SCHEMES["mxfp8"], weight)
    out = vllm_w8a8_mxfp8(standin([]), t["weight"], t["weight_scale"], x, bias, scale_alg=1)
    prepared = MXFP8().prepare(REF, weight, bias, torch.bfloat16)
    qx, s = mx.npu_dynamic_mx_quant(x.reshape(-1, K), dst_type=292, scale_alg=1)
    want = mx.npu_quant_matmul(qx, prepared["weight"], prepared["weight_scale"], pertoken_scale=s,
                               bias=prepared["bias"], output_dtype=15, pertoken_scale_dtype=293, scale_dtype=293,
                               group_sizes=[1, 1, 32]).reshape(2, M, N)
    assert torch.equal(out, want)
    assert not torch.equal(out, mxfx_linear(MXFP8(), weight, x, bias)), "the rule differs from mxfx mxfp8's here"


def test_vllm_ascend_w4a8_mxfp_equals_mxfx_mxfp4_w4a8():
    """vllm-ascend W4A8_MXFP linear (w4a8_mxfp4.py, both layouts): checkpoint uint8 [N, K/2] + uint8
    [N, K/32], npu_format_cast(29, customize_dtype=float8_e4m3fn, input_dtype=296) then .transpose(-1, -2);
    activation E4M3 rint; the bias passed as it comes (bf16 [N]; mxfx passes bf16 [1, N]: same values);
    group_sizes [0, 0, 32]. Same rule as mxfx mxfp4_w4a8."""
    weight, x, bias = inputs()
    calls = []
    t = stored("W4A8_MXFP", SCHEMES["mxfp4_w4a8"], weight)
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (N, K // 2)
    x2d = x.reshape(-1, K)
    out = vllm_w4a8_mxfp(standin(calls), t["weight"], t["weight_scale"], x2d, bias)
    assert torch.equal(out, compiled_linear("mxfp4_w4a8", weight, x2d, bias))
    assert [c[0] for c in calls] == ["npu_format_cast", "npu_dynamic_mx_quant", "npu_quant_matmul"]


def test_vllm_ascend_w4a4_mxfp4_nz_off_equals_mxfx_mxfp4():
    """vllm-ascend W4A4_MXFP4 linear (w4a4_mxfp4.py; NZ off, the snapshot's only branch): uint8 [N, K/2] as
    its [K/2, N] transposed view, scale [K/64, N, 2] view; activation FP4 round_mode="round", bias fp32,
    x1_dtype = x2_dtype = 296, group_sizes [1, 1, 32]. Same rule as mxfx mxfp4."""
    weight, x, bias = inputs()
    calls = []
    t = stored("W4A4_MXFP4", SCHEMES["mxfp4"], weight)
    out = vllm_w4a4_mxfp4(standin(calls), t["weight"], t["weight_scale"], x, bias)
    assert torch.equal(out, mxfx_linear(MXFP4(), weight, x, bias))
    assert calls[0] == ("npu_dynamic_mx_quant", ("dst_type", "round_mode"))


def test_vllm_ascend_w4a4_mxfp4_nz_on_equals_mxfx_mxfp4():
    """vllm-ascend W4A4_MXFP4 with _should_trans_nz true (methods/w4a4/w4a4_mxfp4.py @ 0dfe844, the NZ branch
    of process_weights_after_loading): the packed weight made a contiguous [K/2, N], FP4-NZ-cast, and passed
    as is; the mirror reads an NZ weight in the orientation of its view (K-major as cast, [N, K/2] when
    transposed), as the device does. Before, it read both as [N, K/2]: refused when K != 2N, and silently
    wrong when N == K/2 (this shape)."""
    weight, x, bias = inputs(k=512, n=256)
    t = stored("W4A4_MXFP4", SCHEMES["mxfp4"], weight)
    out = vllm_w4a4_mxfp4(standin([]), t["weight"], t["weight_scale"], x, bias, nz=True)
    assert torch.equal(out, mxfx_linear(MXFP4(), weight, x, bias))


def test_sglang_mxfp8_online_and_offline_equal_mxfx_mxfp8():
    """sglang NPUMXFP8LinearMethod: online (npu_dynamic_mx_quant of the bf16 weight, E4M3 rint) and offline
    (ModelSlim W8A8_MXFP8) give strided [K, N] / [K/64, N, 2] views; scale dtypes as torch.float8_e8m0fnu,
    bias fp32, group_sizes [1, 1, 32]. Same rule as mxfx mxfp8."""
    weight, x, bias = inputs()
    want = mxfx_linear(MXFP8(), weight, x, bias)
    assert torch.equal(sglang_mxfp8(standin([]), x, bias, weight=weight), want)
    t = stored("W8A8_MXFP8", SCHEMES["mxfp8"], weight)
    assert torch.equal(sglang_mxfp8(standin([]), x, bias, stored_weight=t["weight"], weight_scale=t["weight_scale"]),
                       want)


def test_sglang_w4a8_online_rounds_weights_half_away_equals_mxfx_w4a8_round():
    """sglang NPUMXFP4W4A8LinearMethod (online W4A8): the weight is quantized with round_mode="round" (mxfx
    mxfp4_w4a8 and vllm-ascend's msmodelslim weights: rint), so it is compared with
    MXFP4W4A8(weight_round_mode="round"). Its bias goes in fp32 [N] (mxfx: the activation dtype, [1, N])."""
    weight, x, bias = inputs()
    calls = []
    out = sglang_w4a8(standin(calls), x, bias, weight=weight)
    assert torch.equal(out, mxfx_linear(MXFP4W4A8(weight_round_mode="round"), weight, x, bias))
    assert not torch.equal(out, mxfx_linear(MXFP4W4A8(), weight, x, bias)), "the rule differs from mxfp4_w4a8's here"
    assert calls[0] == ("npu_dynamic_mx_quant", ("dst_type", "round_mode"))


def test_sglang_w4a8_offline_equals_mxfx_mxfp4_w4a8():
    """sglang NPUMXFP4W4A8OfflineLinearMethod (ModelSlim W4A8_MXFP, msmodelslim's rint weights): same rule
    as mxfx mxfp4_w4a8."""
    weight, x, bias = inputs()
    t = stored("W4A8_MXFP", SCHEMES["mxfp4_w4a8"], weight)
    out = sglang_w4a8(standin([]), x, bias, stored_weight=t["weight"], weight_scale=t["weight_scale"])
    assert torch.equal(out, mxfx_linear(MXFP4W4A8(), weight, x, bias))


def test_sglang_single_level_w4a4_equals_mxfx_mxfp4():
    """sglang NPUSingleLevelMXFP4LinearMethod (online: weights round_mode="round", compared with
    MXFP4(weight_round_mode="round")) and NPUSingleLevelMXFP4OfflineLinearMethod (ModelSlim W4A4_MXFP4:
    mxfx mxfp4). Activations FP4 round_mode="round", as mxfx mxfp4."""
    weight, x, bias = inputs()
    online = sglang_w4a4(standin([]), x, bias, weight=weight)
    assert torch.equal(online, mxfx_linear(MXFP4(weight_round_mode="round"), weight, x, bias))
    assert not torch.equal(online, mxfx_linear(MXFP4(), weight, x, bias)), "the rule differs from mxfp4's here"
    t = stored("W4A4_MXFP4", SCHEMES["mxfp4"], weight)
    offline = sglang_w4a4(standin([]), x, bias, stored_weight=t["weight"], weight_scale=t["weight_scale"])
    assert torch.equal(offline, compiled_linear("mxfp4", weight, x, bias))


def test_sglang_dual_level_w4a4_equals_mxfx_mxfp4_dual_compiled():
    """sglang NPUDualLevelMXFP4LinearMethod (online dual-level W4A4): weight npu_dynamic_dual_level_mx_quant
    (rint), npu_format_cast(int8 view, 29, customize_dtype=torch.int8), level-0 squeeze(-1).transpose(0, 1);
    activation dual-level rint; bias fp32. Same rule as mxfx mxfp4_dual (K=1024: see the next test for 512)."""
    weight, x, bias = inputs(k=1024)
    calls = []
    out = sglang_dual_level(standin(calls), weight, x, bias)
    assert torch.equal(out, compiled_linear("mxfp4_dual", weight, x, bias))
    assert [c[0] for c in calls] == ["npu_dynamic_dual_level_mx_quant", "npu_format_cast",
                                     "npu_dynamic_dual_level_mx_quant", "npu_dual_level_quant_matmul"]


def test_sglang_dual_level_at_k_512_fails_in_the_client_not_the_mirror():
    """At K=512 the level-0 scale is [N, 1] (torch_npu documents [..., ceil(K/512)], and the mirror returns
    that); sglang's squeeze(-1) makes it [N] and .transpose(0, 1) of a 1-D tensor raises. mxfx's mxfp4_dual
    runs K=512 (it transposes without squeezing)."""
    weight, x, bias = inputs(k=512)
    with pytest.raises(IndexError):
        sglang_dual_level(standin([]), weight, x, bias)
    assert mxfx_linear(DualLevelMXFP4(), weight, x, bias).shape == (2, M, N)
    assert mx.npu_dynamic_dual_level_mx_quant(weight)[1].shape == (N, 1)

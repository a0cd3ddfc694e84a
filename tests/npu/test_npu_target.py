"""Proof without hardware: the small Qwen3 compiled for target "npu" against a recording torch_npu
stand-in calls exactly the ops, arguments and layouts of the scheme table and computes the same logits
as the reference target; the torch_npu integration (fake kernel, GE converter mapping, device checks)."""

import sys
from collections import Counter

import pytest
import torch

import mxfx
from mxfx.dynamo_backend import Backend
from mxfx.ops import npu as npu_support
from mxfx.prepared import PreparedWeights

from .. import npu_standin
from ..models import tiny_qwen3

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))

# per weight at compile time, then per decoder layer at run time (4 activation quants, 7 matmuls)
EXPECTED = {
    "mxfp4_dual": (["npu_dynamic_dual_level_mx_quant", "npu_format_cast"], "npu_dynamic_dual_level_mx_quant",
                   "npu_dual_level_quant_matmul"),
    "mxfp4_w4a8": (["npu_dynamic_mx_quant", "npu_format_cast"], "npu_dynamic_mx_quant", "npu_quant_matmul"),
    "mxfp8": (["npu_dynamic_mx_quant"], "npu_dynamic_mx_quant", "npu_quant_matmul"),
}


@pytest.mark.parametrize("scheme", list(EXPECTED))
def test_qwen3_on_target_npu_calls_the_scheme_table_and_matches_the_reference(torch_npu, scheme):
    model = tiny_qwen3()
    with torch.no_grad():
        npu = torch.compile(model, backend=Backend(scheme, target="npu", cache=PreparedWeights(), fuse=False),
                            fullgraph=True)(IDS)
        calls = list(npu_standin.calls)
        torch._dynamo.reset()
        reference = torch.compile(model, backend=mxfx.backend(scheme, target="reference", fuse=False),
                                  fullgraph=True)(IDS)
    assert torch.equal(npu.logits, reference.logits)
    preparation, quant, matmul = EXPECTED[scheme]
    prepared = len(preparation) * 14
    assert [name for name, _ in calls[:prepared]] == preparation * 14
    run = Counter(name for name, _ in calls[prepared:])
    assert run == {quant: 8, matmul: 14}, "2 layers x (4 activation quantizations, 7 matmuls)"
    first_matmul = next(args for name, args in calls if name == matmul)
    assert first_matmul["x1"][0] == 16, "the activation is flattened to [batch * seq, K]"


@pytest.mark.parametrize("scheme", list(EXPECTED))
def test_the_fused_graph_on_target_npu_calls_the_fused_ops_and_matches_the_reference(torch_npu, scheme):
    """The default pipeline: per layer one matmul for q/k/v and one for gate/up (their codes merged once at
    compile time), the norms' quantizations fused into the norms and down_proj's into the SwiGLU, except on
    the dual-level scheme, which has no fused quantizer."""
    model = tiny_qwen3()
    with torch.no_grad():
        npu = torch.compile(model, backend=Backend(scheme, target="npu", cache=PreparedWeights()), fullgraph=True)(IDS)
        calls = list(npu_standin.calls)
        torch._dynamo.reset()
        reference = torch.compile(model, backend=mxfx.backend(scheme, target="reference"), fullgraph=True)(IDS)
    assert torch.equal(npu.logits, reference.logits)
    preparation, quant, matmul = EXPECTED[scheme]
    # per layer, in graph order: q/k/v's codes and one layout, o_proj, gate/up's codes and one layout, down_proj;
    # no sibling is prepared on its own (the rewrite's constants are deferred until the merge has run)
    quantize, layout = preparation[:1], preparation[1:]
    layer = quantize * 3 + layout + preparation + quantize * 2 + layout + preparation
    prepared = len(layer) * 2
    assert [name for name, _ in calls[:prepared]] == layer * 2
    run = Counter(name for name, _ in calls[prepared:])
    if scheme == "mxfp4_dual":
        assert run == {quant: 8, matmul: 8}, "2 layers x (4 activation quantizations, 4 matmuls)"
    else:
        assert run == {"npu_rms_norm_dynamic_mx_quant": 1, "npu_add_rms_norm_dynamic_mx_quant": 3,
                       "npu_swiglu_mx_quant": 2, quant: 2, matmul: 8}, "o_proj's input alone is quantized alone"


def test_the_fake_kernel_mxfx_adds_for_the_dual_level_matmul(torch_npu):
    npu_support.register_dual_level_matmul_fake()
    assert npu_support.register_dual_level_matmul_fake() is False, "registered once"
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.npu.npu_dual_level_quant_matmul(
            torch.empty(5, 256, dtype=torch.uint8), torch.empty(64, 256, dtype=torch.int8), torch.empty(5, 1),
            torch.empty(1, 64), torch.empty(5, 8, 2, dtype=torch.uint8), torch.empty(64, 8, 2, dtype=torch.uint8),
            output_dtype=5)
    assert out.shape == (5, 64) and out.dtype == torch.float16


def test_ge_converter_argument_mapping():
    inputs, attrs = npu_support.dual_level_matmul_ir("x1", "x2", "x1_l0", "x2_l0", "x1_l1", "x2_l1", "bias", 15)
    assert list(inputs.items()) == [("x1", "x1"), ("x2", "x2"),
                                    ("x1_level0_scale", "x1_l0"), ("x1_level1_scale", "x1_l1"),
                                    ("x2_level0_scale", "x2_l0"), ("x2_level1_scale", "x2_l1"), ("bias", "bias")]
    assert attrs == {"dtype": 15, "transpose_x1": False, "transpose_x2": True, "level0_group_size": 512,
                     "level1_group_size": 32}
    assert npu_support.register_ge_converter() is False, "no torchair here: nothing registered"


def test_npus_older_than_ascend_950(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", npu_standin.module(soc_version=250, device_name="Ascend910_9391"))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="predates Ascend 950"), pytest.warns(UserWarning, match="predates"):
        torch.compile(tiny_qwen3(layers=1), backend=mxfx.backend(target="npu"), fullgraph=True)(IDS)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="CPU reference target instead") as warned:
        be = mxfx.backend(target="auto")
        with torch.no_grad():
            torch.compile(tiny_qwen3(layers=1), backend=be, fullgraph=True)(IDS)
    assert be.reports[-1].target == "reference"
    assert sum("CPU reference target instead" in str(w.message) for w in warned) == 1, "the device is probed once"


def test_auto_target(monkeypatch):
    assert mxfx.backend().target.name == "reference"  # no torch_npu here
    monkeypatch.setitem(sys.modules, "torch_npu", npu_standin.module())
    assert mxfx.backend().target.name == "npu"
    monkeypatch.setitem(sys.modules, "torch_npu", npu_standin.module(devices=False))
    assert mxfx.backend().target.name == "reference"


def test_import_mxfx_does_not_import_torch_npu(tmp_path):
    import os
    import subprocess

    (tmp_path / "torch_npu.py").write_text("raise ImportError('mxfx imported torch_npu')\n")  # importable, and loud
    code = "import sys, mxfx, passes, mxfx.ops; print('torch_npu' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_torchair_inner_gets_the_users_config_and_frozen_parameter_constants(monkeypatch):
    import types

    seen = {}

    class CompilerConfig:
        def __init__(self):
            self.mode = "max-autotune"
            self.experimental_config = types.SimpleNamespace(frozen_parameter=False)

    def get_npu_backend(*, compiler_config=None):
        def npu_backend(gm, example_inputs):
            seen["config"], seen["inputs"] = compiler_config, example_inputs
            return gm.forward

        return npu_backend

    monkeypatch.setitem(sys.modules, "torchair", types.SimpleNamespace(CompilerConfig=CompilerConfig,
                                                                       get_npu_backend=get_npu_backend))
    from mxfx.dynamo_backend import torchair_inner

    config = CompilerConfig()
    config.mode = "reduce-overhead"
    model = tiny_qwen3(layers=1)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference", inner=torchair_inner(config)))(IDS)
        torch._dynamo.reset()
        expected = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"))(IDS)
    assert seen["config"] is config and config.mode == "reduce-overhead" and config.experimental_config.frozen_parameter
    constants = [t for t in seen["inputs"]
                 if isinstance(t, torch.nn.Parameter) and t.dtype in (torch.float8_e4m3fn, torch.uint8)]
    assert len(constants) == 8, "4 matmuls after merging (q/k/v, o, gate/up, down): weights and scales, frozen"
    assert torch.equal(got.logits, expected.logits)


@pytest.mark.parametrize("scheme", ["mxfp4_dual", "mxfp4_w4a8"])
def test_a_checkpoint_on_target_npu_feeds_the_stored_codes_to_the_device_ops(torch_npu, tmp_path, scheme):
    from mxfx import checkpoint, evaluation

    model = checkpoint.load(checkpoint.quantize(evaluation.SHIPPED_MODEL, scheme, tmp_path / "q"))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        npu = torch.compile(model, backend=Backend("modelslim", target="npu", cache=PreparedWeights()))(ids)
        calls = [name for name, _ in npu_standin.calls]
        torch._dynamo.reset()
        reference = torch.compile(model, backend=mxfx.backend("modelslim", target="reference"))(ids)
    assert torch.equal(npu.logits, reference.logits)
    # stored codes are NZ-cast on the device, never re-quantized, each once: 4 layers' o_proj and down_proj, and
    # the 8 merged q/k/v, gate/up (the siblings are not laid out on their own)
    assert calls.count("npu_format_cast") == 4 * 2 + 8
    assert "npu_dynamic_dual_level_mx_quant" not in calls[:16] and "npu_dynamic_mx_quant" not in calls[:16]


def test_an_int4_checkpoint_on_target_npu_packs_each_weight_once_and_matches_the_reference(torch_npu, tmp_path):
    from mxfx import checkpoint

    from .. import msmodelslim

    bf16 = tmp_path / "bf16"
    tiny_qwen3().save_pretrained(bf16)
    model = checkpoint.load(msmodelslim.int4_folder(bf16, tmp_path / "int4", "v1", 128)[0])
    with torch.no_grad():
        npu = torch.compile(model, backend=Backend("modelslim", target="npu", cache=PreparedWeights()),
                            fullgraph=True)(IDS)
        calls = Counter(name for name, _ in npu_standin.calls)
        torch._dynamo.reset()
        reference = torch.compile(model, backend=mxfx.backend("modelslim", target="reference"), fullgraph=True)(IDS)
    assert torch.equal(npu.logits, reference.logits)
    assert calls == {"npu_convert_weight_to_int4pack": 14, "npu_weight_quant_batchmatmul": 14}

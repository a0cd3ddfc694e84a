"""msmodelslim W4A8_DYNAMIC (int4) checkpoints, written by tests/msmodelslim.py from the documented format
(one int4 per byte or two per byte along N, per-channel and two-level per-group scales, zero offsets,
scale_bias), loaded and compiled; the expectation is the ops-nn golden
formula applied by hand: Wdq = bf16(q * bf16(weight_scale * weight_scale_second)), y = bf16(x @ Wdq)."""

import json

import pytest
import torch

import mxfx
from mxfx import checkpoint
from mxfx.checkpoint import TYPES, CheckpointError, QuantizedWeight
from mxfx.stored_weights import STORED_WEIGHTS

from .. import msmodelslim

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


class GoldenLinear(torch.nn.Module):
    def __init__(self, wdq: torch.Tensor):
        super().__init__()
        self.w = wdq.float().t().contiguous()  # [K, N] fp32 holding values of the activations' dtype

    def forward(self, x):
        return (x.reshape(-1, x.shape[-1]).float() @ self.w).to(x.dtype).reshape(*x.shape[:-1], -1)


def _golden_logits(model_dir, golden, dtype):
    from mxfx import evaluation

    model = evaluation.load_model(model_dir).to(dtype)
    for prefix, wdq in golden.items():
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, GoldenLinear(wdq))
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("variant, group, dtype", [
    ("v0", 128, torch.bfloat16), ("v1", 128, torch.bfloat16), ("v1", 256, torch.bfloat16), ("v1", 0, torch.bfloat16),
    ("v1", 128, torch.float16),
], ids=["unpacked-g128", "packed-g128", "packed-g256", "packed-per-channel", "packed-g128-fp16"])
def test_int4_checkpoints_run_through_the_weight_quant_matmul(model_dir, tmp_path, variant, group, dtype):
    folder, golden = msmodelslim.int4_folder(model_dir, tmp_path / "int4", variant, group, dtype)
    model = checkpoint.load(folder)
    if dtype == torch.bfloat16:
        for prefix, wdq in golden.items():
            weight = model.get_parameter(f"{prefix}.weight")
            assert torch.equal(weight, wdq) and weight.is_contiguous(), "the eager weight is the device's Wdq"
    model = model.to(dtype)  # the stored tensors stay with the parameters
    be = mxfx.backend("modelslim", target="reference")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=be, fullgraph=True)(IDS).logits
    torch._dynamo.reset()
    report = be.reports[-1]
    layout = f"group {group}" if group else "per channel"
    assert (len(report.rewritten) == 14
            and {r.scheme for r in report.rewritten} == {f"modelslim/w4a8_dynamic ({layout})"})
    assert report.activation_quants == 0, "W4A8_DYNAMIC linears do not quantize the activation"
    assert got.dtype == dtype and torch.equal(got, _golden_logits(model_dir, golden, dtype))


def test_a_biased_int4_linear_adds_its_bias_in_fp32():
    linear = torch.nn.Linear(256, 64, dtype=torch.bfloat16)
    q, channel, second = msmodelslim.int4_quantize(linear.weight.detach(), 128)
    STORED_WEIGHTS.add(linear.weight, QuantizedWeight(TYPES["W4A8_DYNAMIC"], {
        "weight": msmodelslim.int4_pack(q), "weight_scale": channel, "weight_scale_second": second}, 128))
    wdq = msmodelslim.int4_golden(q, channel, second, 128)
    x = torch.randn(3, 256).bfloat16()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(linear, backend=mxfx.backend("modelslim"))(x)
    torch._dynamo.reset()
    assert torch.equal(got, (x.float() @ wdq.float().t().contiguous() + linear.bias.float()).bfloat16())


@pytest.fixture
def int4(model_dir, tmp_path):
    return msmodelslim.int4_folder(model_dir, tmp_path / "good", "v1", 128)[0]


Q = "model.layers.0.self_attn.q_proj"  # [512, 512]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t[f"{Q}.weight_offset"].fill_(1)),
         f"{Q}.weight_offset is not zero"),
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t[f"{Q}.weight_offset_second"].fill_(-1)),
         f"{Q}.weight_offset_second is not zero"),
        (lambda f: msmodelslim.edit_tensors(
            f, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][:100].contiguous()})),
         rf"{Q}.weight has shape \[100, 512\]; W4A8_DYNAMIC stores a \[512, 512\] weight"),
        (lambda f: msmodelslim.edit_tensors(
            f, lambda t: t.update({f"{Q}.weight": torch.full((512, 512), 9, dtype=torch.int8)})),
         r"holds values in \[9, 9\]; int4 is \[-8, 7\]"),
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t.update({f"{Q}.weight_scale_second": torch.ones(512, 8),
                                                 f"{Q}.weight_offset_second": torch.zeros(512, 8)})),
         rf"{Q}.weight_scale_second has 8 groups for K=512, a group size of 64; .* the description says 128"),
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t.update({f"{Q}.weight_scale_second": torch.ones(512, 5),
                                                 f"{Q}.weight_offset_second": torch.zeros(512, 5)})),
         "5 groups for K=512, a group size of 102.4"),
        (lambda f: (msmodelslim.edit_tensors(f, lambda t: t.pop(f"{Q}.weight_scale_second")),
                    msmodelslim.describe(f, f"{Q}.weight_scale_second", None)),
         f"{Q}.weight_offset_second is stored without"),
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t.update({f"{Q}.weight_scale_second": torch.ones(512, 0),
                                                                   f"{Q}.weight_offset_second": torch.zeros(512, 0)})),
         "has 0 groups for K=512, a group size of none"),
        (lambda f: msmodelslim.edit_tensors(
            f, lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].to(torch.int32)})),
         f"{Q}.weight_scale is torch.int32"),
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t.pop(f"{Q}.weight_offset")),
         f"missing tensor {Q}.weight_offset"),
    ],
    ids=["offset", "offset-second", "weight-shape", "int4-range", "group-vs-description", "group-not-32",
         "offset-alone", "no-groups", "scale-dtype", "missing-offset"],
)
def test_bad_int4_checkpoints_name_the_file_and_tensor(int4, damage, message):
    damage(int4)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(int4)


def test_the_group_size_comes_from_the_tensors_when_the_description_has_none(model_dir, tmp_path):
    folder, _ = msmodelslim.int4_folder(model_dir, tmp_path / "nogroup", "v1", 128)
    description = json.loads((folder / checkpoint.DESCRIPTION).read_text())
    del description["group_size"]
    (folder / checkpoint.DESCRIPTION).write_text(json.dumps(description))
    model = checkpoint.load(folder)
    assert checkpoint.stored_weights(model)[Q].group_size == 128

"""examples/activation_ceiling.py: its rounding is each scheme's own activation quantizer, its rotation is
undone exactly in real arithmetic, and its hooks leave the model as it was."""

import importlib.util
from pathlib import Path

import pytest
import torch

from mxfx.recovery.rotation import BlockRotation, rotate
from mxfx.schemes import SCHEMES
from mxfx.targets import get_target

from ..models import tiny_qwen3

SCRIPT = Path(__file__).parents[2] / "examples" / "activation_ceiling.py"


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("activation_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_rounding_is_the_schemes_activation_quantizer(ceiling, name):
    """The scheme's reference linear against an identity weight (exact in every weight format) returns its
    activation as its quantizer rounds it: the script's rounding, bit for bit."""
    scheme, target = SCHEMES[name], get_target("reference")
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)).bfloat16() * 3
    x[3, 7] = 40.0  # a block with an outlier
    prepared = scheme.prepare(target, torch.eye(512, dtype=torch.bfloat16), None, torch.bfloat16)
    rounded = ceiling.activation_rounding(scheme)(x)
    assert not torch.equal(rounded, x)
    assert torch.equal(scheme.linear(target, x, prepared), rounded)


@pytest.mark.parametrize("block", [0, 32])
def test_hooks_round_the_selected_inputs_and_leave(ceiling, block):
    """Layer 0's q_proj reads the same input either way, so inside the context it reads exactly that input
    rounded (rotated, rounded and rotated back); lm_head (excluded by default) gets no hook; on exit the
    hooks are gone and the logits are the model's again."""
    model = tiny_qwen3(layers=1)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    q_proj, seen = model.model.layers[0].self_attn.q_proj, []
    record = q_proj.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        before = model(ids).logits
        with ceiling.rounded_inputs(model, SCHEMES["mxfp4_dual"], block):
            assert len(q_proj._forward_pre_hooks) == 1 and not model.lm_head._forward_pre_hooks
            rounded = model(ids).logits
        after = model(ids).logits
    record.remove()
    assert torch.equal(before, after) and not torch.equal(before, rounded)
    assert not q_proj._forward_pre_hooks
    rounding, x = ceiling.activation_rounding(SCHEMES["mxfp4_dual"]), seen[0]
    if block:
        blocks = BlockRotation(block).activation_blocks(512).float()
        expected = rotate(rounding(rotate(x.float(), blocks).bfloat16()).float(), torch.linalg.inv(blocks)).bfloat16()
    else:
        expected = rounding(x)
    assert torch.equal(seen[1], expected) and not torch.equal(seen[1], x)

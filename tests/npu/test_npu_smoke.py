"""examples/npu_smoke.py's kernel checks, run against the recording torch_npu stand-in (tensors stay on
the CPU): the script the hardware run depends on is exercised here, and its comparisons can fail."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from .. import npu_standin

SCRIPT = Path(__file__).parents[2] / "examples" / "npu_smoke.py"


@pytest.fixture
def smoke(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", npu_standin.module())
    monkeypatch.setattr(torch.Tensor, "npu", lambda self: self, raising=False)
    spec = importlib.util.spec_from_file_location("npu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_checks_pass_against_the_reference(smoke, capsys):
    smoke.check_kernels()
    smoke.check_int4()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 4 + 5 and all(line.startswith("ok ") for line in lines), "3 per scheme, 5 for int4"


@pytest.mark.parametrize("device, reference", [
    ([float("nan"), 1.0], [1.0, 1.0]),  # a NaN where the reference is finite
    ([float("inf"), 1.0], [float("-inf"), 1.0]),
    ([1.0, 1.01], [1.0, 1.0]),
])
def test_close_fails_on_a_mismatch(smoke, device, reference):
    with pytest.raises(SystemExit, match="FAIL"):
        smoke._close("case", torch.tensor(device), torch.tensor(reference))

"""Calibration: statistics per distinct linear input against ones computed from the captured inputs, the
file round trip, and the errors that name the linear."""

import pytest
import torch

from mxfx.calibrating import calibrate
from mxfx.calibration import Calibration, CalibrationError


class Toy(torch.nn.Module):
    """q, k, v read one input; o reads another."""

    def __init__(self, k=64, n=32):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(k, n) for _ in range(3))
        self.o = torch.nn.Linear(n, k)

    def forward(self, x):
        return self.o(self.q(x) * self.k(x) + self.v(x))


def _batches(seed=0, count=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 5, 64, generator=g) * torch.linspace(0.1, 8, 64) for _ in range(count)]


def test_statistics_per_shared_input_match_the_captured_inputs():
    model, batches = Toy(), _batches()
    calibration = calibrate(model, batches)
    assert [s.members for s in calibration.inputs] == [("q", "k", "v"), ("o",)]
    x = torch.cat([b.reshape(-1, 64) for b in batches]).double()
    stats = calibration.stats("k")
    torch.testing.assert_close(stats.amax.double(), x.abs().amax(0))
    torch.testing.assert_close(stats.gram, x.T @ x, rtol=1e-6, atol=1e-4)
    assert stats.tokens == 60
    with torch.no_grad():
        hidden = torch.cat([(model.q(b) * model.k(b) + model.v(b)).reshape(-1, 32) for b in batches]).double()
    torch.testing.assert_close(calibration.stats("o").amax.double(), hidden.abs().amax(0), rtol=1e-6, atol=1e-6)


def test_a_calibration_round_trips_through_its_file(tmp_path):
    model = Toy()
    calibration = calibrate(model, _batches())
    calibration.save(tmp_path / "cal.safetensors")
    loaded = Calibration.load(tmp_path / "cal.safetensors")
    loaded.check(model)
    for a, b in zip(calibration.inputs, loaded.inputs):
        assert a.members == b.members and a.tokens == b.tokens
        assert torch.equal(a.amax, b.amax) and torch.equal(a.gram, b.gram)
    amax_only = calibrate(model, _batches(), gram=False)
    amax_only.save(tmp_path / "amax.safetensors")
    assert all(s.gram is None for s in Calibration.load(tmp_path / "amax.safetensors").inputs)


def test_a_calibration_for_another_model_is_refused_naming_a_linear():
    calibration = calibrate(Toy(), _batches())
    with pytest.raises(CalibrationError, match=r"another model: linear q is \[N, K\] = \[32, 48\]"):
        calibration.check(Toy(k=48))
    bigger = torch.nn.Sequential()
    bigger.add_module("q", torch.nn.Linear(64, 32))
    with pytest.raises(CalibrationError, match="another model: it has linear k, which the model lacks"):
        calibration.check(bigger)
    with_extra = Toy()
    with_extra.extra = torch.nn.Linear(64, 64)
    with pytest.raises(CalibrationError, match="linear extra of the model has no calibration statistics"):
        calibration.check(with_extra)
    with pytest.raises(CalibrationError, match="linear extra has no calibration statistics"):
        calibration.stats("extra")


def test_bad_statistics_and_files_are_refused_naming_the_linear(tmp_path):
    nan = _batches(count=1)
    nan[0][0, 0, 3] = float("nan")
    with pytest.raises(CalibrationError, match="calibration of q: its input abs-max has inf/NaN"):
        calibrate(Toy(), nan)
    with pytest.raises(CalibrationError, match="calibration of q: its input abs-max is zero in every channel"):
        calibrate(Toy(), [torch.zeros(2, 3, 64)])
    with pytest.raises(CalibrationError, match="no batches"):
        calibrate(Toy(), [])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CalibrationError, match="not an mxfx calibration file"):
        Calibration.load(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CalibrationError, match="cannot read the calibration"):
        Calibration.load(tmp_path / "broken.safetensors")


def test_the_sample_is_seeded_rows_of_the_input_and_round_trips(tmp_path):
    model, batches = Toy(), _batches()
    calibration = calibrate(model, batches, sample_rows=16)
    x = torch.cat([b.reshape(-1, 64) for b in batches])
    sample = calibration.stats("q").sample
    assert sample.shape == (16, 64) and sample.dtype == x.dtype
    rows = (sample.unsqueeze(1) == x.unsqueeze(0)).all(-1)  # [16, 60]: which input row each sample row is
    assert (rows.sum(1) == 1).all() and rows.any(0).sum() == 16  # 16 distinct rows of the input
    assert torch.equal(calibrate(model, batches, sample_rows=16).stats("q").sample, sample)  # seeded
    assert calibrate(model, batches, sample_rows=100).stats("q").sample.shape == (60, 64)  # fewer rows than asked
    calibration.save(tmp_path / "cal.safetensors")
    loaded = Calibration.load(tmp_path / "cal.safetensors")
    assert all(torch.equal(a.sample, b.sample) for a, b in zip(calibration.inputs, loaded.inputs))
    without = calibrate(model, batches, sample_rows=0)  # what a file written before samples existed holds
    without.save(tmp_path / "old.safetensors")
    assert all(s.sample is None for s in Calibration.load(tmp_path / "old.safetensors").inputs)


def test_a_bad_sample_is_refused_naming_the_linear(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    calibrate(Toy(), _batches(), sample_rows=8).save(tmp_path / "cal.safetensors")
    with safe_open(str(tmp_path / "cal.safetensors"), framework="pt") as file:
        tensors, metadata = {name: file.get_tensor(name) for name in file.keys()}, file.metadata()
    tensors["1.sample"][3, 5] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(CalibrationError, match="calibration of o: its input sample has inf/NaN entries"):
        Calibration.load(tmp_path / "nan.safetensors")
    tensors["1.sample"] = torch.ones(4, 7)
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(CalibrationError, match=r"calibration of o: input sample \[4, 7\] for K=32"):
        Calibration.load(tmp_path / "shape.safetensors")
    with pytest.raises(CalibrationError, match="sample_rows must be >= 0"):
        calibrate(Toy(), _batches(), sample_rows=-1)

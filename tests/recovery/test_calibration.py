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


# -- from the traced graph, against the hooks of the eager model ------------------------------------
@torch.no_grad()
def _hooked(model, batches, gram=True, sample_rows=512):
    """The oracle: nn.Linear forward pre-hooks on the eager model, linears grouped by the tensor object
    they read in a forward, groups seeded in forward order (what mxfx.calibration did before the graph)."""
    from mxfx.calibration import Accumulator, InputStats

    names = {m: n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    seen, accumulators = {}, {}

    def hook(module, args):
        seen.setdefault(id(args[0]), (args[0], []))[1].append(names[module])

    handles = [m.register_forward_pre_hook(hook) for m in names]
    try:
        for batch in batches:
            seen.clear()
            model(**batch) if isinstance(batch, dict) else model(batch)
            for x, members in seen.values():
                key = tuple(dict.fromkeys(members))
                accumulators.setdefault(key, Accumulator(x.shape[-1], gram, sample_rows, len(accumulators))).add(x)
    finally:
        for handle in handles:
            handle.remove()
    inputs = [InputStats(key, a.amax, a.gram, a.tokens, a.sample) for key, a in accumulators.items()]
    return Calibration(inputs, {n: (m.out_features, m.in_features) for m, n in names.items()})


def _assert_same(calibration, oracle):
    assert [s.members for s in calibration.inputs] == [s.members for s in oracle.inputs]
    assert calibration.signature == oracle.signature
    for ours, theirs in zip(calibration.inputs, oracle.inputs):
        assert ours.tokens == theirs.tokens
        assert torch.equal(ours.amax, theirs.amax), ours.members  # bit-identical: the graph runs eager's ops
        for a, b in ((ours.gram, theirs.gram), (ours.sample, theirs.sample)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), ours.members


def _ids(shape, seed, vocab=256):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_the_shipped_model_calibrates_as_its_eager_hooks_see_it():
    """q/k/v one entry, o, gate/up one entry, down per layer, and lm_head (tied to the embedding): the same
    groups, bit-identical statistics and the same seeded samples as hooks on the eager bf16 model."""
    from mxfx import evaluation

    model = evaluation.load_model(evaluation.SHIPPED_MODEL)
    batches = [_ids((1, 32), seed) for seed in range(2)]
    calibration = calibrate(model, batches, sample_rows=32)
    _assert_same(calibration, _hooked(model, batches, sample_rows=32))
    layer = "model.layers.0."
    assert [s.members for s in calibration.inputs[:4]] == [
        tuple(f"{layer}self_attn.{p}_proj" for p in "qkv"), (f"{layer}self_attn.o_proj",),
        (f"{layer}mlp.gate_proj", f"{layer}mlp.up_proj"), (f"{layer}mlp.down_proj",)]
    assert calibration.inputs[-1].members == ("lm_head",) and len(calibration.inputs) == 4 * 4 + 1


def test_batches_of_other_shapes_and_input_dicts_accumulate_into_the_same_entries():
    """A second and third batch shape recompile (then dynamic shapes): still every row of every batch."""
    from tests.models import tiny_qwen3

    model = tiny_qwen3(layers=1)
    batches = [_ids((2, 16), 0), _ids((1, 24), 1), {"input_ids": _ids((3, 8), 2)}]
    _assert_same(calibrate(model, batches, gram=False), _hooked(model, batches, gram=False))


def test_the_users_model_is_unchanged_and_no_compiled_state_is_left(monkeypatch):
    import gc
    import weakref

    from mxfx import calibrating
    from tests.models import tiny_qwen3

    collectors, collector = [], calibrating._Collector
    monkeypatch.setattr(calibrating, "_Collector", lambda *a: collectors.append(collector(*a)) or collectors[-1])
    model = tiny_qwen3(layers=1)
    before = {name: (t, t.clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    calibrate(model, [_ids((2, 16), 0)])
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == before.keys()
    assert all(after[name] is t and torch.equal(t, copy) for name, (t, copy) in before.items())
    assert type(model).__name__ == "Qwen3ForCausalLM" and not model.training and "forward" not in vars(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    backend = weakref.ref(collectors.pop())
    gc.collect()
    assert backend() is None  # no cached graph holds the collecting backend (Dynamo was reset)


class Functional(torch.nn.Module):
    """An F.linear on a parameter of a module that is not an nn.Linear (the rewrite quantizes it too)."""

    def __init__(self, n=64, k=64):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, k, dtype=torch.bfloat16) / 8)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class Mixed(torch.nn.Module):
    """fn (F.linear on its parameter) and q/k (nn.Linear) on one input; a graph break; down on another."""

    def __init__(self, n=64):
        super().__init__()
        self.fn = Functional(n)
        self.q, self.k = torch.nn.Linear(64, n, dtype=torch.bfloat16), torch.nn.Linear(64, n, dtype=torch.bfloat16)
        self.down = torch.nn.Linear(n, 64, dtype=torch.bfloat16)

    def forward(self, x):
        h = self.fn(x) * self.q(x) + self.k(x)
        torch._dynamo.graph_break()
        return self.down(torch.nn.functional.silu(h))


def _grid_batches(count=2):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 8, 64, generator=g) * torch.linspace(0.5, 4, 64)).bfloat16() for _ in range(count)]


def test_a_functional_linear_and_a_graph_break_are_calibrated_as_the_rewrite_sees_them():
    import mxfx

    model, batches = Mixed(), _grid_batches()
    calibration = calibrate(model, batches)
    assert [s.members for s in calibration.inputs] == [("fn", "q", "k"), ("down",)]  # two graphs
    assert calibration.signature == {"fn": (64, 64), "q": (64, 64), "k": (64, 64), "down": (64, 64)}
    x = torch.cat([b.reshape(-1, 64) for b in batches]).float()
    assert torch.equal(calibration.stats("fn").amax, x.abs().amax(0))
    with torch.no_grad():
        h = torch.cat([torch.nn.functional.silu(model.fn(b) * model.q(b) + model.k(b)).reshape(-1, 64)
                       for b in batches]).float()
    assert torch.equal(calibration.stats("down").amax, h.abs().amax(0))
    torch.testing.assert_close(calibration.stats("down").gram, (h.T @ h).double(), rtol=1e-5, atol=1e-3)
    calibration.check(model)  # the functional linear is the model's: its module holds a [64, 64] parameter
    with pytest.raises(CalibrationError, match=r"another model: linear fn is \[N, K\] = \[32, 64\] here"):
        calibration.check(Mixed(n=32))
    with pytest.raises(CalibrationError, match="linear fn has no calibration statistics"):  # what the hooks missed
        _hooked(model, batches).stats("fn")
    be = mxfx.backend("mxfp8", target="reference", recipe="gptq", calibration=calibration)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=be)(batches[0])
    torch._dynamo.reset()
    rewritten = {r.fqn: r for report in be.reports for r in report.rewritten}
    assert set(rewritten) == {"fn", "q", "k", "down"}


class Twice(torch.nn.Module):
    """q/k on x and again on y (one activation's statistics, both calls'); `lone`: q alone on y."""

    def __init__(self, lone=False):
        super().__init__()
        self.q, self.k = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
        self.lone = lone

    def forward(self, x):
        y = self.q(x) + self.k(x)
        return self.q(y) if self.lone else self.q(y) * self.k(y)


def test_a_linear_called_twice_accumulates_both_calls_or_is_refused_naming_it():
    model, batches = Twice(), _batches(count=2)
    calibration = calibrate(model, batches)
    assert [s.members for s in calibration.inputs] == [("q", "k")] and calibration.inputs[0].tokens == 2 * 40
    with torch.no_grad():
        rows = torch.cat([torch.cat([b, model.q(b) + model.k(b)]).reshape(-1, 64) for b in batches])
    assert torch.equal(calibration.stats("q").amax, rows.abs().amax(0))
    torch.testing.assert_close(calibration.stats("k").gram, (rows.T @ rows).double(), rtol=1e-5, atol=1e-3)
    with pytest.raises(CalibrationError, match=r"linear q is called on inputs shared with different linears \(q on "
                                               r"one, q, k on another\)"):
        calibrate(Twice(lone=True), batches)


class Tied(torch.nn.Module):
    """Two F.linear calls on two parameters of `block`: one FQN for two weights."""

    def __init__(self):
        super().__init__()
        self.block = Functional()
        self.block.other = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16))
        self.block.forward = self.twice

    def twice(self, x):
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.block.weight), self.block.other)

    def forward(self, x):
        return self.block(x)


class Branch(Toy):
    def forward(self, x):
        return self.o(self.q(x)) if x.shape[0] > 1 else self.q(x)


def test_a_batch_taking_another_path_or_two_weights_under_one_fqn_are_refused():
    with pytest.raises(CalibrationError, match="calibration batch 1: linear o read no input"):
        calibrate(Branch(), [torch.randn(2, 64), torch.randn(1, 64)])
    with pytest.raises(CalibrationError, match=r"linear block: two weights \(\[64, 64\] and \[64, 64\]\)"):
        calibrate(Tied(), _grid_batches(1))
    with pytest.raises(CalibrationError, match="no linear with a parameter weight"):
        calibrate(torch.nn.ReLU(), _batches(count=1))

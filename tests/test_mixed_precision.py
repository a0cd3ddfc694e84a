"""Mixed precision under a budget: the solver against brute force, the budget against the bytes the rewrite
reports, one activation quantization per group of siblings, the errors, the model left unchanged, the
sensitivity file, and a mixed checkpoint's round trip."""

import importlib.util
import itertools
import math
import random
import re

import pytest
import torch

import mxfx
from mxfx import checkpoint, evaluation
from mxfx import mixed_precision as mp
from mxfx.calibrating import calibrate
from mxfx.selection import SkipReason
from tests.compiled import compiled
from tests.models import tiny_qwen3

BATCHES = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3(layers=1)


@pytest.fixture(scope="module")
def sensitivity(model):
    return mp.measure(model, BATCHES, progress=False)


def _brute_force(sensitivity, bits, share):
    """The lowest summed KL over every per-linear assignment that meets the budget and the constraint."""
    fqns = list(sensitivity.linears)
    budget = mp.budget_bytes(bits, sensitivity.elements)
    best = None
    for labels in itertools.product(*(sensitivity.linears[f].options for f in fqns)):
        choice = dict(zip(fqns, labels))
        options = {f: sensitivity.linears[f].options[choice[f]] for f in fqns}
        if sum(o.bytes for o in options.values()) > budget:
            continue
        if any(len({(options[m].activation, options[m].scheme if share == "type" else None) for m in group}) > 1
               for group in sensitivity.groups):
            continue
        kl = sum(o.kl for o in options.values())
        best = kl if best is None else min(best, kl)
    return best


def _compiled(model, plan):
    out, be = compiled(model, BATCHES[0], scheme=plan)
    return out.logits, be.reports[-1]


def test_the_measurement_leaves_the_model_unchanged_and_groups_the_siblings(model, sensitivity):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mp.measure(model, BATCHES[:1], candidates=["mxfp8"], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert sensitivity.groups == [("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                   "model.layers.0.self_attn.v_proj"), ("model.layers.0.self_attn.o_proj",),
                                  ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
                                  ("model.layers.0.mlp.down_proj",)]
    assert "lm_head" not in sensitivity.linears
    q = sensitivity.linears["model.layers.0.self_attn.q_proj"].options
    # the bytes: codes + E8M0 scales per 32 (+ fp32 per 512 for dual-level); bf16 16 bits
    assert [q[label].bytes for label in ("bf16", "mxfp8", "mxfp4_w4a8", "mxfp4_dual")] == [
        512 * 512 * 2, 512 * 512 * 33 // 32, 512 * 512 * 17 // 32, 512 * 512 * 17 // 32 + 512 * 4]
    assert q["mxfp8"].activation == q["mxfp4_w4a8"].activation != q["mxfp4_dual"].activation
    assert all(o.kl > 0 for label, o in q.items() if label != "bf16")


@pytest.mark.parametrize("share", mp.SHARES)
def test_the_solver_finds_what_brute_force_finds_on_the_measured_model(sensitivity, share):
    for bits in (4.25, 4.3, 4.8, 6.0, 9.0, 16.0):
        plan = mp.solve(sensitivity, bits, share)
        assert plan.bytes <= mp.budget_bytes(bits, sensitivity.elements)
        assert math.isclose(plan.kl, _brute_force(sensitivity, bits, share), rel_tol=1e-12, abs_tol=1e-15)


def _synthetic(seed: int) -> mp.Sensitivity:
    """Random sensitivities on a made-up layer: groups of 3, 1, 2 and 1 linears; option bytes in
    bits 16 / 8.25 / 4.25 / 4.3125, activation keys A (8-bit activations) and B (dual-level)."""
    rng = random.Random(seed)
    shapes = [(64, 32), (32, 32), (32, 32), (32, 64), (96, 32), (96, 32), (32, 96)]
    kinds = {"mxfp8": (8.25, "A", "mxfp8"), "mxfp4_w4a8": (4.25, "A", "mxfp4_w4a8"),
             "mxfp4_w4a8+gptq": (4.25, "A", "mxfp4_w4a8"), "mxfp4_dual": (4.3125, "B", "mxfp4_dual")}
    linears = []
    for i, (n, k) in enumerate(shapes):
        options = {"bf16": mp.Option(2 * n * k, 0.0, None, None)}
        for label, (bits, key, name) in kinds.items():
            if rng.random() < 0.85:
                options[label] = mp.Option(int(bits * n * k / 8), rng.random(), key, name)
        linears.append(mp.Linear(f"l{i}", n, k, options))
    groups = [("l0", "l1", "l2"), ("l3",), ("l4", "l5"), ("l6",)]
    return mp.Sensitivity(linears, groups, tuple(kinds), "", "", 1)


@pytest.mark.parametrize("seed", range(4))
def test_the_solver_finds_what_brute_force_finds_on_random_sensitivities(seed):
    sensitivity = _synthetic(seed)
    minimum = 8 * sum(min(o.bytes for o in lin.options.values()) for lin in sensitivity.linears.values())
    for share in mp.SHARES:
        for bits in (*(minimum / sensitivity.elements + d for d in (0.0, 0.1, 0.7, 2.5, 5.0)), 16.0):
            try:
                plan = mp.solve(sensitivity, bits, share)
            except mp.BudgetError:
                assert _brute_force(sensitivity, bits, share) is None
                continue
            assert plan.bytes <= mp.budget_bytes(bits, sensitivity.elements)
            assert math.isclose(plan.kl, _brute_force(sensitivity, bits, share), rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("bits", [4.3, 5.0, 7.0])
def test_the_budget_holds_for_the_bytes_the_rewrite_counts_and_siblings_share_one_quantization(model, sensitivity,
                                                                                               bits):
    plan = mp.solve(sensitivity, bits)
    _, report = _compiled(model, plan)
    measured = {r.fqn: r for r in report.linears if r.fqn in sensitivity.linears}
    assert len(measured) == len(sensitivity.linears)
    for fqn, r in measured.items():
        if plan.choices[fqn] == "bf16":
            assert r.skip_reason is SkipReason.NO_SCHEME
        else:
            assert r.outcome == "rewritten" and r.scheme == plan.choices[fqn]
    counted = sum(r.bytes_after if r.outcome == "rewritten" else r.bytes_before for r in measured.values())
    assert counted == plan.bytes <= mp.budget_bytes(bits, sensitivity.elements)
    quantized_groups = [g for g in sensitivity.groups if plan.choices[g[0]] != "bf16"]
    assert report.activation_quants == len(quantized_groups), "one activation quantization per group"
    for group in sensitivity.groups:
        assert len({sensitivity.linears[m].options[plan.choices[m]].activation for m in group}) == 1


def test_auto_in_the_backend_is_the_solved_plan(model, sensitivity):
    plan = mp.solve(sensitivity, 5.0)
    expected, _ = _compiled(model, plan)
    torch._dynamo.reset()
    be = mxfx.backend(scheme="auto", bits=5.0, calibration=sensitivity, target="reference")
    with torch.no_grad():
        got = torch.compile(model, backend=be, fullgraph=True)(BATCHES[0]).logits
    assert torch.equal(got, expected)
    assert be.scheme.choices == plan.choices and "auto (4." in be.scheme.label
    with pytest.raises(ValueError, match="needs bits="):
        mxfx.backend(scheme="auto", calibration=sensitivity)
    with pytest.raises(ValueError, match="needs calibration=mxfx.mixed_precision.measure"):
        mxfx.backend(scheme="auto", bits=5.0)
    with pytest.raises(ValueError, match="bits= is for scheme='auto'"):
        mxfx.backend(scheme="mxfp8", bits=5.0)


def test_a_budget_too_small_names_the_minimum(sensitivity):
    with pytest.raises(mp.BudgetError, match=r"the minimum achievable .* is 4\.2500 bits"):
        mp.solve(sensitivity, 4.2)
    assert mp.solve(sensitivity, 4.25).bits == 4.25


def test_plans_that_break_the_constraints_are_refused(sensitivity):
    choices = dict.fromkeys(sensitivity.linears, "mxfp8")
    mp.Plan(sensitivity, choices)
    with pytest.raises(ValueError, match="q_proj, .*k_proj, .*v_proj share an activation but would quantize it in 2"):
        mp.Plan(sensitivity, {**choices, "model.layers.0.self_attn.k_proj": "mxfp4_dual"})
    with pytest.raises(ValueError, match="share an activation but would quantize it in 2"):
        mp.Plan(sensitivity, {**choices, "model.layers.0.self_attn.k_proj": "bf16"})
    mp.Plan(sensitivity, {**choices, "model.layers.0.self_attn.k_proj": "mxfp4_w4a8"})  # same activation
    with pytest.raises(ValueError, match="share='type'"):
        mp.Plan(sensitivity, {**choices, "model.layers.0.self_attn.k_proj": "mxfp4_w4a8"}, share="type")
    with pytest.raises(ValueError, match="missing model.layers.0.mlp.down_proj"):
        mp.Plan(sensitivity, {k: v for k, v in choices.items() if "down" not in k})


def test_gptq_candidates_share_the_activation_of_plain_mxfp8(model):
    calibration = calibrate(model, BATCHES)
    sensitivity = mp.measure(model, BATCHES[:1], calibration, candidates=["mxfp8", "mxfp4_w4a8+gptq"],
                             include="*.k_proj", progress=False)  # GPTQ takes seconds per linear
    q = sensitivity.linears["model.layers.0.self_attn.k_proj"].options
    assert q["mxfp8"].activation == q["mxfp4_w4a8+gptq"].activation
    with pytest.raises(ValueError, match="recipe gptq needs a calibration"):
        mp.measure(model, BATCHES, candidates=["mxfp4_w4a8+gptq"], progress=False)


def test_the_sensitivity_file_round_trips_and_refuses_other_weights(model, sensitivity, tmp_path):
    path = tmp_path / "cal.sensitivity.json"
    sensitivity.save(path)
    loaded = mp.Sensitivity.load(path, model)
    assert mp.solve(loaded, 5.0).choices == mp.solve(sensitivity, 5.0).choices
    other = tiny_qwen3(layers=1, seed=1)
    with pytest.raises(ValueError, match="measured on other weights"):
        mp.Sensitivity.load(path, other)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not an mxfx sensitivity file"):
        mp.Sensitivity.load(path, model)


def test_a_mixed_checkpoint_reads_back_to_the_same_logits(model, sensitivity, tmp_path):
    plan = mp.solve(sensitivity, 6.0, share="type")
    assert len({label for label in plan.choices.values()}) > 1, "a mixed plan"
    model.save_pretrained(tmp_path / "bf16")
    out = checkpoint.quantize(tmp_path / "bf16", plan.schemes(), tmp_path / "q")
    types, _ = checkpoint.read_description(out)
    written = {name.removesuffix(".weight"): kind for name, kind in types.items() if name.endswith(".weight")}
    assert {fqn: written[fqn] for fqn in plan.choices} == {
        fqn: "FLOAT" if label == "bf16" else checkpoint.WRITTEN_TYPES[label] for fqn, label in plan.choices.items()}
    reloaded = evaluation.load_model(tmp_path / "bf16")  # as transformers loads it (RoPE buffers in fp32)
    sensitivity.bind(reloaded)
    expected, _ = _compiled(reloaded, plan)
    loaded = checkpoint.load(out)
    got, report = _compiled(loaded, "modelslim")
    assert torch.equal(got, expected)
    assert {r.fqn: r.outcome for r in report.linears if r.fqn in plan.choices} == {
        fqn: "skipped" if label == "bf16" else "rewritten" for fqn, label in plan.choices.items()}


def test_rotated_candidates_cannot_be_written(model, tmp_path):
    sensitivity = mp.measure(model, BATCHES[:1], candidates=["mxfp4_dual+rotate"], progress=False)
    plan = mp.Plan(sensitivity, dict.fromkeys(sensitivity.linears, "mxfp4_dual+rotate"))
    model.save_pretrained(tmp_path / "bf16")
    with pytest.raises(checkpoint.CheckpointError, match="cannot be written .its activation constants .rotation"):
        checkpoint.quantize(tmp_path / "bf16", plan.schemes(), tmp_path / "q")


def test_the_commands_take_scheme_auto(tmp_path, capsys):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mxfx import cli

    config = Qwen3Config(vocab_size=257, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # byte-level: vocab 257
    auto = ["--scheme", "auto", "--bits", "6", "--candidates", "mxfp8", "mxfp4_w4a8", "--calibration-tokens", "256",
            "--calibration", str(tmp_path / "cal.safetensors")]
    assert cli.main(["quantize", "--model", str(tmp_path / "bf16"), "--out", str(tmp_path / "q"), *auto]) == 0
    assert (tmp_path / "cal.safetensors.sensitivity.json").is_file()
    types = set(checkpoint.read_description(tmp_path / "q")[0].values())
    assert {"W8A8_MXFP8", "W4A8_MXFP"} <= types, "a mixed checkpoint"
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "bf16"), *auto, "--max-tokens", "256", "--new-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mxfx auto: [\d.]+ bits per weight element \(budget 6.0 bits\)", out), "the plan's table"
    assert re.search(r"\nauto \([\d.]+ bits\) ", out), "its perplexity row"
    assert cli.main(["inspect", "--model", str(tmp_path / "bf16"), "--scheme", "mxfp8", "--bits", "5"]) == 2
    assert "--bits is for --scheme auto" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", str(tmp_path / "bf16"), "--out", str(tmp_path / "q2"), *auto[:3], "5",
                     "6", *auto[4:]]) == 2
    assert "give one --bits value" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", str(tmp_path / "bf16"), "--out", str(tmp_path / "q2"), "--scheme", "mxfp8",
                     "--tp", "2"]) == 2
    assert "--bits and --tp are for --scheme auto" in capsys.readouterr().err


def test_eval_runs_a_curve_of_plans_with_the_budgets_bits(tmp_path, capsys):
    from mxfx import cli

    tiny_qwen3(layers=2, vocab_size=257, max_position_embeddings=512).save_pretrained(tmp_path / "bf16")
    args = ["eval", "--model", str(tmp_path / "bf16"), "--scheme", "auto", "first-blocks", "mxfp8", "--bits", "5",
            "6.5", "--candidates", "mxfp8", "mxfp4_w4a8", "--max-tokens", "256", "--new-tokens", "0",
            "--sensitivity-tokens", "256", "--calibration-tokens", "256"]
    plot = importlib.util.find_spec("matplotlib") is not None  # the optional extra mxfx[plot]
    assert cli.main([*args, *(["--plot", str(tmp_path / "layers.png")] if plot else [])]) == 0
    out = capsys.readouterr().out
    assert "first-blocks: first 1 bf16 (10.12 bits), the rest mxfp4_w4a8" in out
    rows = dict(re.findall(r"\n((?:auto|first 1 bf16) \([\d.]+ bits\)|mxfp8) +[\d.]+ +([\d.]+) ", out))
    assert rows == {"auto (5.00 bits)": "5.0000", "auto (6.50 bits)": "6.5000", "first 1 bf16 (10.12 bits)": "10.1250",
                    "mxfp8": "8.2500"}, "the table's bits are the plan's: its bf16 linears counted at 16"
    if plot:
        assert (tmp_path / "layers.png").stat().st_size and (tmp_path / "layers-bits.png").stat().st_size


@pytest.fixture(scope="module")
def two_blocks():
    model = tiny_qwen3(layers=2)
    return model, mp.measure(model, BATCHES[:1], candidates=["mxfp8", "mxfp4_w4a8", "mxfp4_dual"], progress=False)


def test_first_blocks_keeps_the_first_n_blocks_in_bf16(two_blocks):
    _, sensitivity = two_blocks
    assert mp.blocks(sensitivity) == 2
    assert mp.smallest(sensitivity) == "mxfp4_w4a8"  # 4.25 bits against dual-level's 4.3125 and mxfp8's 8.25
    plan = mp.first_blocks(sensitivity, 1, "mxfp4_w4a8")
    assert {fqn: label for fqn, label in plan.choices.items()} == {
        fqn: "bf16" if ".layers.0." in fqn else "mxfp4_w4a8" for fqn in sensitivity.linears}
    assert plan.label.startswith("first 1 bf16 (") and plan.series == "first N blocks bf16, the rest mxfp4_w4a8"
    half = sum(linear.elements for fqn, linear in sensitivity.linears.items() if ".layers.0." in fqn)
    assert plan.bytes == 2 * half + sum(linear.options["mxfp4_w4a8"].bytes for fqn, linear in
                                        sensitivity.linears.items() if ".layers.1." in fqn)
    with pytest.raises(ValueError, match="linear lm_head: not inside a decoder block"):
        mp.block_of("lm_head")


def test_a_restricted_measurement_drops_only_the_named_options(two_blocks):
    model, sensitivity = two_blocks
    down = "model.layers.1.mlp.down_proj"
    restricted = sensitivity.restricted({down: {"mxfp4_dual"}})
    assert list(restricted.linears[down].options) == ["bf16", "mxfp8", "mxfp4_w4a8"]
    assert "mxfp4_dual" in sensitivity.linears[down].options, "the original is unchanged"
    plan = mp.Plan(restricted, dict.fromkeys(restricted.linears, "mxfp8"))
    assert plan.scheme_for(model.get_submodule(down).weight).name == "mxfp8", "still bound to the model"
    with pytest.raises(ValueError, match="mxfp4_dual' is not one of its options"):
        mp.Plan(restricted, {**plan.choices, down: "mxfp4_dual"})
    with pytest.raises(ValueError, match="bf16 is every linear's option"):
        sensitivity.restricted({down: {"bf16"}})


def test_tensor_parallel_constraints_drop_what_a_k_slice_breaks(two_blocks):
    from mxfx import parallel

    model, sensitivity = two_blocks
    constrained, dropped = parallel.constrain(sensitivity, model, 2)
    # row-parallel o_proj (K 512 -> 256) and down_proj (1536 -> 768) break dual-level's 512 rule at TP=2
    assert {(fqn, label) for fqn, label, _ in dropped} == {
        (f"model.layers.{i}.{name}", "mxfp4_dual") for i in (0, 1) for name in ("self_attn.o_proj", "mlp.down_proj")}
    assert "K/2 = 768" in next(why for fqn, _, why in dropped if fqn.endswith("layers.0.mlp.down_proj"))
    plan = mp.solve(constrained, 4.3)
    assert all(plan.choices[fqn] != "mxfp4_dual" for fqn, _, _ in dropped)
    assert parallel.constrain(sensitivity, model, 1)[1] == []
    with pytest.raises(parallel.ParallelError, match="tp_size"):
        parallel.constrain(sensitivity, model, 3)


def test_tensor_parallel_refuses_a_selector_that_forgets_the_shards(two_blocks):
    from mxfx import parallel

    model, sensitivity = two_blocks
    plan = mp.Plan(sensitivity, dict.fromkeys(sensitivity.linears, "mxfp8"))
    report, _ = parallel.plan(model, 2, plan)
    with pytest.raises(parallel.ParallelError, match=r"chooses schemes by the weights themselves .* none for "
                                                     r"model.layers.0.self_attn.q_proj's shard"):
        parallel.check_shardable(model, report, plan)
    report, _ = parallel.plan(model, 2, "mxfp8")
    parallel.check_shardable(model, report, "mxfp8")  # a scheme serves any weight


def test_recipe_candidates_measure_and_combine_their_linears_unfolded(model):
    """A folded pair (o_proj's rotation in v_proj's rows) is right only together; a candidate is measured one
    linear at a time and the plan may give the pair different schemes, so candidates never fold (the same
    recipe through recipes.apply does)."""
    folded = mxfx.recipes.apply("mxfp4_dual", "rotate", None, model)
    assert any(s.fold_input for s in folded.schemes())
    candidate = mp._resolve(["mxfp4_dual+rotate"], None, model)["mxfp4_dual+rotate"]
    schemes = candidate.schemes()
    assert schemes and not any(s.fold_input or s.head_rotation is not None for s in schemes)

"""TP=2 against TP=1 on gloo (two spawned ranks, conftest.py): per scheme, column-parallel outputs are the
TP=1 output's slices bit for bit; the all-reduce sums the ranks' bf16 partials (exactly); a row-parallel
output differs from TP=1 only by the rounding of each partial to bf16 (its activation slice quantizes
exactly as TP=1's, the blocks being whole); logits within the tolerance the README states."""

import pytest
import torch

from mxfx.schemes import SCHEMES

from .workers import COLUMN_PROBES, ROW_PROBES

# the README's tolerance: the partials' bf16 rounding, carried through later activation quantizations, moves
# the logits by a fraction of what quantization moves them from bf16 (mean and max |difference|)
MEAN_SHARE, MAX_SHARE = 0.25, 0.4


def _slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    step = t.shape[-1] // 2
    return t[..., rank * step:(rank + 1) * step]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_column_outputs_are_bit_identical_slices(ranks, scheme):
    for rank, results in enumerate(ranks):
        r = results[scheme]
        for name in COLUMN_PROBES:
            assert torch.equal(r["captured"][f"{name}/out"], _slice(r["ref_captured"][f"{name}/out"], rank)), name


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_row_outputs_sum_the_partials(ranks, scheme):
    """The reduced output is the bf16 sum of the two ranks' bf16 partials, and o_proj's (whose input is
    bit-identical to TP=1's) is within the partials' bf16 rounding of TP=1's output: a K slice that
    quantized differently would be off by the MX quantization error, orders of magnitude more."""
    partial = [ranks[rank][scheme]["captured"] for rank in range(2)]
    for name in ROW_PROBES:
        p0, p1 = (p[f"{name}/out"].float() for p in partial)
        for rank in range(2):
            assert torch.equal(partial[rank][f"{name}/reduced"], (p0 + p1).bfloat16()), name
    name = ROW_PROBES[0]
    p0, p1 = (p[f"{name}/out"].float() for p in partial)
    ref = ranks[0][scheme]["ref_captured"][f"{name}/out"].float()
    assert ((p0 + p1).bfloat16().float() - ref).abs().le(2 ** -8 * (p0.abs() + p1.abs() + ref.abs())).all()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_logits_match_tp1(ranks, scheme, record_property):
    r0, r1 = ranks[0][scheme], ranks[1][scheme]
    assert torch.equal(r0["logits"], r1["logits"])  # the ranks agree
    difference = (r0["logits"].float() - r0["ref"].float()).abs()
    quantization = (r0["bf16"].float() - r0["ref"].float()).abs()
    agree = (r0["logits"].argmax(-1) == r0["ref"].argmax(-1)).float().mean().item()
    record_property("measured", f"{scheme}: TP=2 vs TP=1 |logit diff| max {difference.max():.4f} mean "
                                f"{difference.mean():.5f}; TP=1 vs bf16 max {quantization.max():.4f} mean "
                                f"{quantization.mean():.5f}; top-1 TP=2 = TP=1 {agree:.1%}")
    assert difference.mean() <= MEAN_SHARE * quantization.mean() and difference.max() <= MAX_SHARE * quantization.max()
    assert all(outcome == "rewritten" for name, outcome, _ in r0["linears"] if name != "lm_head")


def test_every_block_whole_quantizes_as_asked(ranks):
    plan = ranks[0]["mxfp4_dual"]["plan"]
    assert {(name.rpartition(".")[2], kind, k, n, decision) for name, kind, k, n, _, decision in plan} >= {
        ("q_proj", "column", 512, 512, "quantize"), ("k_proj", "column", 512, 256, "quantize"),
        ("o_proj", "row", 512, 512, "quantize"), ("down_proj", "row", 1024, 512, "quantize")}


def test_512_rule_broken_at_tp2_falls_back_to_mxfp4(ranks):
    r = ranks[0]["fallback"]
    decisions = {name: (k, scheme, decision) for name, _, k, _, scheme, decision in r["plan"]}
    assert decisions["model.layers.0.self_attn.o_proj"] == (256, "mxfp4", "fallback")
    assert decisions["model.layers.0.mlp.down_proj"] == (768, "mxfp4", "fallback")
    assert decisions["model.layers.0.self_attn.q_proj"][1:] == ("mxfp4_dual", "quantize")
    assert "K/2 breaks the rule" in r["table"] and "2 linears as mxfp4" in r["label"]
    ran = {name: scheme for name, outcome, scheme in r["linears"] if outcome == "rewritten"}
    assert ran["model.layers.0.mlp.down_proj"] == "mxfp4" and ran["model.layers.0.mlp.up_proj"] == "mxfp4_dual"
    assert (r["logits"].float() - r["ref"].float()).abs().mean() <= 0.05


def test_checkpoint_loaded_per_rank_matches_it_loaded_whole(ranks):
    """Per-rank loading against the whole checkpoint: within tolerance of it at TP=1, and the same codes
    and logits as loading it whole and sharding it in memory."""
    for results in ranks:
        r = results["loaded"]
        assert "not connected to its group" in r["unconnected"]
        assert torch.equal(r["logits"], ranks[0]["loaded"]["logits"])
        assert (r["logits"].float() - r["ref"].float()).abs().mean() <= 0.05
        assert r["same_codes"] and torch.equal(r["eager"], r["sharded_eager"])
        assert all(scheme == "modelslim/mxfp4_dual" for *_, scheme, _ in results["loaded"]["plan"][:-1])


def test_bad_input_raises_on_every_rank(ranks):
    for results in ranks:
        assert "does not divide its 3 KV heads" in results["kv_heads"]
        assert "loaded as rank 0 of TP=2, but this process is rank 1" in results["same_slice"]
        assert "loaded as rank 0 of TP=4" in results["other_tp"] and "tp_size=2" in results["other_tp"]
        assert "already parallelized" in results["twice"]


def test_dtensor_model_is_refused_saying_what_to_do(ranks):
    for results in ranks:
        for key in ("dtensor_tp", "dtensor_compile"):
            assert "is a DTensor" in results[key] and "mxfx.parallel.tensor_parallel(model)" in results[key]

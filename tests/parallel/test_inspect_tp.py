"""`mxfx inspect --tp N`: the per-linear split of a model folder, nothing sharded or run."""

from mxfx.cli import main
from mxfx.evaluation import SHIPPED_MODEL


def test_inspect_tp_prints_each_linear_split_and_decision(capsys):
    assert main(["inspect", "--model", str(SHIPPED_MODEL), "--tp", "2", "--scheme", "mxfp4_dual"]) == 0
    out = capsys.readouterr().out
    assert "TP=2" in out and "8 moved to a fallback scheme" in out
    rows = {line.split()[0]: line.split()[1:6] for line in out.splitlines() if line.startswith(("model.", "lm_head"))}
    assert rows["model.layers.0.self_attn.q_proj"] == ["column", "512", "256", "mxfp4_dual", "quantize"]
    assert rows["model.layers.0.mlp.down_proj"] == ["row", "768", "512", "mxfp4", "fallback"]
    assert rows["lm_head"][:4] == ["replicated", "512", "257", "-"]


def test_inspect_tp_refuses_a_size_that_does_not_divide_the_heads(capsys):
    assert main(["inspect", "--model", str(SHIPPED_MODEL), "--tp", "3", "--scheme", "mxfp8"]) == 2
    assert "tp_size 3 does not divide its 8 attention heads" in capsys.readouterr().err

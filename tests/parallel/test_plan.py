"""The per-linear plan, decided before anything is sharded (no process group needed)."""

import pytest

from mxfx import checkpoint
from mxfx.parallel import ParallelError, check_divisible, plan

from ..models import tiny_qwen3


def test_a_row_slice_no_scheme_serves_is_refused_before_sharding():
    model = tiny_qwen3(layers=1, intermediate_size=1056)  # 33 * 32: 528 per rank is not a multiple of 32
    before = model.model.layers[0].mlp.down_proj.weight
    with pytest.raises(ParallelError, match=r"no scheme serves the local K of model.layers.0.mlp.down_proj "
                                            r"\(row-parallel K=1056, 528 per rank: K=528 is not a multiple of 32"):
        plan(model, 2, "mxfp8")  # mxfp8 has no fallback
    assert model.model.layers[0].mlp.down_proj.weight is before


def test_stored_dual_level_codes_are_not_moved_to_another_scheme(tmp_path):
    folder = tmp_path / "bf16"
    tiny_qwen3(layers=1).save_pretrained(folder)
    model = checkpoint.load(checkpoint.quantize(folder, "mxfp4_dual", tmp_path / "dual"))
    with pytest.raises(ParallelError, match="o_proj .*its stored codes are not re-quantized"):
        plan(model, 2)


def test_a_linear_that_fails_the_rule_unsharded_too_is_left_as_at_tp1():
    rows = {p.name: p for p in plan(tiny_qwen3(layers=1, intermediate_size=1056), 2, "mxfp4_dual")[0].linears}
    assert rows["model.layers.0.self_attn.q_proj"].decision == "quantize"
    assert rows["model.layers.0.self_attn.o_proj"].decision == "fallback"
    assert (rows["model.layers.0.mlp.down_proj"].decision, rows["model.layers.0.mlp.down_proj"].scheme) == (
        "not quantized", "mxfp4_dual")


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_attention_heads": 6, "num_key_value_heads": 2}, "does not divide its 6 attention heads"),
    ({"num_key_value_heads": 2}, "tp_size 4 does not divide its 2 KV heads"),
    ({"intermediate_size": 1546}, "does not divide its intermediate size 1546"),
])
def test_sizes_that_do_not_divide_are_named(fields, message):
    with pytest.raises(ParallelError, match=message):
        check_divisible(tiny_qwen3(layers=1, **fields), 4)


def test_models_built_like_qwen3_are_planned_too():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=2048, num_hidden_layers=1,
                                         num_attention_heads=8, num_key_value_heads=4))
    kinds = {p.name.rpartition(".")[2]: (p.kind, p.k, p.n) for p in plan(llama, 2, "mxfp8")[0].linears}
    assert kinds["k_proj"] == ("column", 512, 128) and kinds["down_proj"] == ("row", 1024, 512)

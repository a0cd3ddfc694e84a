"""Quantized checkpoints: write -> read -> compile round trips for every scheme, msmodelslim layouts
built here from the documented format (independently of the writer), and every bad input."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mxfx
from mxfx import checkpoint, cli, evaluation
from mxfx.checkpoint import CheckpointError
from mxfx.formats import quantize_mx

from .. import msmodelslim
from ..compiled import compiled

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
SCHEMES = ["mxfp8", "mxfp4_w4a8", "mxfp4_dual", "mxfp4"]


def _logits(model, scheme):
    out, be = compiled(model, IDS, scheme=scheme)
    return out.logits, be.reports[-1]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_save_load_compile_round_trip(model_dir, tmp_path, scheme):
    out = checkpoint.quantize(model_dir, scheme, tmp_path / "q")
    description = json.loads((out / checkpoint.DESCRIPTION).read_text())
    assert description["model.layers.0.self_attn.q_proj.weight"] == checkpoint.WRITTEN_TYPES[scheme]
    assert description["lm_head.weight"] == "FLOAT" and description["model.norm.weight"] == "FLOAT"
    loaded = checkpoint.load(out)
    stored = checkpoint.stored_weights(loaded)["model.layers.1.mlp.down_proj"]
    written = load_file(out / "model.safetensors")
    for suffix, tensor in stored.tensors.items():  # read back bit-identically
        assert torch.equal(tensor.view(torch.uint8),
                           written[f"model.layers.1.mlp.down_proj.{suffix}"].view(torch.uint8))
    expected, _ = _logits(evaluation.load_model(model_dir), scheme)  # as transformers loads the bf16 folder
    got, report = _logits(loaded, checkpoint.scheme_of(out))
    assert torch.equal(got, expected), "compiling the checkpoint = compiling the in-memory quantized model"
    assert len(report.rewritten) == 14 and {r.scheme for r in report.rewritten} == {f"modelslim/{scheme}"}


def test_sharded_checkpoints_load_like_single_files(model_dir, tmp_path):
    single = checkpoint.quantize(model_dir, "mxfp8", tmp_path / "one")
    sharded = checkpoint.quantize(model_dir, "mxfp8", tmp_path / "many", shard_bytes=1 << 20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 3 and sorted(p.name for p in sharded.glob("*.safetensors")) == shards
    expected = checkpoint.load(single).state_dict()
    got = checkpoint.load(sharded).state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())

    (sharded / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[1]}: listed in model.safetensors.index.json but missing"):
        checkpoint.load(sharded)
    (single / "model.safetensors").rename(sharded / shards[1])  # a file holding every tensor, among the shards
    with pytest.raises(CheckpointError, match=f"{shards[1]}: tensor .* is also in"):
        checkpoint.load(sharded)


def test_msmodelslim_w4a8_exports_packed_and_fp8_container_run_alike(model_dir, tmp_path):
    packed = checkpoint.load(msmodelslim.mx_folder(model_dir, tmp_path / "packed", lambda n: "W4A8_MXFP"))
    container = checkpoint.load(msmodelslim.mx_folder(model_dir, tmp_path / "fp8", lambda n: "W4A8_MXFP_FP8"))
    expected, _ = _logits(evaluation.load_model(model_dir), "mxfp4_w4a8")
    got_packed, report_packed = _logits(packed, "modelslim")
    got_container, report_container = _logits(container, "modelslim")
    assert torch.equal(got_packed, expected) and torch.equal(got_container, expected)
    assert {r.scheme for r in report_packed.rewritten} == {"modelslim/mxfp4_w4a8"}
    assert {r.scheme for r in report_container.rewritten} == {"modelslim/mxfp8"}, "run like MXFP8"


def test_mixed_types_and_float_layers_are_reported_per_linear(model_dir, tmp_path):
    types = lambda n: "FLOAT" if "layers.1" in n else ("W8A8_MXFP8" if "self_attn" in n else "W4A8_MXFP")  # noqa: E731
    model = checkpoint.load(msmodelslim.mx_folder(model_dir, tmp_path / "mixed", types))
    _, report = _logits(model, "modelslim")
    by_name = {r.fqn: r for r in report.linears}
    assert by_name["model.layers.0.self_attn.q_proj"].scheme == "modelslim/mxfp8"
    assert by_name["model.layers.0.mlp.up_proj"].scheme == "modelslim/mxfp4_w4a8"
    assert (by_name["model.layers.1.mlp.up_proj"].outcome == "skipped"
            and "stored unquantized" in by_name["model.layers.1.mlp.up_proj"].reason)
    assert "scheme" in str(report).splitlines()[1], "the table says which path each linear took"


@pytest.fixture
def good(model_dir, tmp_path):
    return msmodelslim.mx_folder(model_dir, tmp_path / "good", lambda n: "W8A8_MXFP8")


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t.pop(f"{Q}.weight_scale")),
         f"missing tensor {Q}.weight_scale"),
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t.update(junk=torch.zeros(2))), "extra tensor junk"),
        (lambda f: msmodelslim.edit_tensors(
            f, lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:, :3].contiguous()})),
         f"{Q}.weight_scale has shape [512, 3], expected [512, 16]"),
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].float()})),
         f"{Q}.weight is torch.float32"),
        (lambda f: msmodelslim.edit_tensors(
            f, lambda t: t.update({"model.norm.weight": torch.ones(3, dtype=torch.bfloat16)})),
         "model.norm.weight is torch.bfloat16 [3]; the model's parameter is torch.bfloat16 [512]"),
        (lambda f: msmodelslim.describe(f, f"{Q}.weight", "W2A2_MAGIC"), "unknown type 'W2A2_MAGIC'"),
        (lambda f: msmodelslim.describe(f, f"{Q}.smooth", "W8A8_MXFP8"),
         f"missing tensor {Q}.smooth .in quant_model_description.json as W8A8_MXFP8."),
        (lambda f: msmodelslim.describe(f, f"{Q}.weight_scale", "FLOAT"),
         f"{Q}.weight_scale is described as FLOAT but {Q}.weight as W8A8_MXFP8"),
        (lambda f: (msmodelslim.edit_tensors(f, lambda t: t.update({f"{Q}.smooth": torch.ones(512)})),
                    msmodelslim.describe(f, f"{Q}.smooth", "W8A8_MXFP8")),
         f"extra tensor {Q}.smooth .described as W8A8_MXFP8, but no linear of that type stores it."),
        (lambda f: (msmodelslim.edit_tensors(f, lambda t: t.update({"model.junk": torch.ones(2)})),
                    msmodelslim.describe(f, "model.junk", "FLOAT")), "model.junk is not a parameter of a qwen3 model"),
        (lambda f: (msmodelslim.edit_tensors(f, lambda t: t.pop("model.norm.weight")),
                    msmodelslim.describe(f, "model.norm.weight", None)),
         "missing tensors model.norm.weight"),
        (lambda f: msmodelslim.describe(f, f"{Q}.weight", "W4A4_MXFP4_SVD"), "W4A4_MXFP4_SVD .* does not support yet"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
         "truncated or corrupt"),
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: (f / checkpoint.DESCRIPTION).unlink(), "not a quantized"),
        (lambda f: msmodelslim.edit_tensors(f, lambda t: t[f"{Q}.weight_scale"][3, 5:7].fill_(0xFF)),
         f"model.safetensors: {Q}.weight_scale holds the E8M0 NaN code 0xFF (2 blocks, first at row 3, block 5)"),
    ],
    ids=["missing", "extra", "scale-shape", "dtype", "float-shape", "unknown-type", "described-absent",
         "described-twice", "described-unused", "not-a-parameter", "missing-parameter", "not-yet", "truncated",
         "no-config", "no-description", "nan-scale"],
)
def test_bad_checkpoints_name_the_file_and_tensor(good, damage, message):
    damage(good)
    with pytest.raises(CheckpointError,
                       match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        checkpoint.load(good)


def test_a_quantized_lm_head_that_the_config_ties_to_the_embeddings_is_refused(good):
    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    q, scale = quantize_mx(load_file(good / "model.safetensors")["lm_head.weight"], "fp8_e4m3")
    msmodelslim.edit_tensors(
        good, lambda t: t.update({"lm_head.weight": q, "lm_head.weight_scale": scale.view(torch.uint8)}))
    msmodelslim.describe(good, "lm_head.weight", "W8A8_MXFP8")
    msmodelslim.describe(good, "lm_head.weight_scale", "W8A8_MXFP8")
    with pytest.raises(CheckpointError, match="lm_head.weight is stored as W8A8_MXFP8, but config.json ties it"):
        checkpoint.load(good)


def test_quantize_refuses_an_existing_folder_and_leaves_nothing_when_interrupted(model_dir, tmp_path, monkeypatch):
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.quantize(model_dir, "mxfp8", tmp_path / "exists")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.write, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.quantize(model_dir, "mxfp8", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"], "no partial folder is left behind"


def test_quantize_command(model_dir, tmp_path, capsys):
    assert cli.main(
        ["quantize", "--model", str(model_dir), "--scheme", "mxfp4_dual", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / checkpoint.DESCRIPTION).is_file() and "wrote" in capsys.readouterr().out
    assert cli.main(
        ["quantize", "--model", str(tmp_path / "nowhere"), "--scheme", "mxfp8", "--out", str(tmp_path / "r")]) == 2


def test_eval_and_inspect_a_checkpoint_of_the_shipped_model(tmp_path, capsys):
    out = checkpoint.quantize(evaluation.SHIPPED_MODEL, "mxfp8", tmp_path / "q")  # tied embeddings, byte-level
    model = checkpoint.load(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert cli.main(["inspect", "--model", str(out)]) == 0
    assert "28 rewritten" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(out), "--max-tokens", "512", "--new-tokens", "2"]) == 0
    out_text = capsys.readouterr().out
    assert "modelslim" in out_text and "modelslim/mxfp8" in out_text and "stored weights dequantized" in out_text


def test_a_description_that_is_not_a_json_object_is_named(good):
    (good / checkpoint.DESCRIPTION).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="quant_model_description.json: a JSON list, expected an object"):
        checkpoint.load(good)


def test_quantize_refuses_a_checkpoint_and_a_folder_with_nothing_to_quantize(model_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    done = checkpoint.quantize(model_dir, "mxfp8", tmp_path / "q")
    assert cli.main(["quantize", "--model", str(done), "--scheme", "mxfp8", "--out", str(tmp_path / "qq")]) == 2
    assert "is already a quantized checkpoint" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    assert cli.main(["quantize", "--model", str(gpt2), "--scheme", "mxfp8", "--out", str(tmp_path / "g")]) == 2
    assert "nothing to quantize" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="nothing to quantize"):
        checkpoint.quantize(model_dir, "mxfp8", tmp_path / "none", exclude=["*"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "q"], "nothing written"


def test_quantized_folders_follow_the_umask_and_have_their_own_readme(model_dir, tmp_path):
    (model_dir / "README.md").write_text("the bf16 model")
    old = os.umask(0o022)
    try:
        out = checkpoint.quantize(model_dir, "mxfp4_dual", tmp_path / "q")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}["model.safetensors"] == 0o644
    readme = (out / "README.md").read_text()
    assert "mxfp4_dual" in readme and str(model_dir) in readme and "checkpoint.load" in readme


def test_quantize_removes_what_a_killed_run_left_and_names_the_users_folder_when_it_cannot_write(
        model_dir, tmp_path, monkeypatch, capsys):
    stale = tmp_path / ".q.partial-999999999"  # no such process
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"half")
    checkpoint.quantize(model_dir, "mxfp8", tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"] and f"removed {stale}" in capsys.readouterr().err

    read_only = tmp_path / "ro"
    read_only.mkdir()
    mkdir = os.mkdir

    def refused(path, *args, **kwargs):  # a read-only folder (root ignores chmod, so refuse here)
        if Path(path).parent == read_only:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused)
    assert cli.main(["quantize", "--model", str(model_dir), "--scheme", "mxfp8", "--out", str(read_only / "q")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {read_only / 'q'}: Permission denied" in err and "partial" not in err


def test_non_finite_scales_are_refused_and_eval_fails_on_a_non_finite_loss(model_dir, tmp_path, capsys):
    """Before: a stored scale of 0xFF (NaN) loaded silently and `mxfx eval` printed ppl nan, top-1 100%, exit 0."""
    out = checkpoint.quantize(model_dir, "mxfp4_dual", tmp_path / "q")
    msmodelslim.edit_tensors(out, lambda t: t[f"{Q}.weight_dual_scale"][0, 0].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=f"{Q}.weight_dual_scale holds 1 non-finite values"):
        checkpoint.load(out)
    model = evaluation.load_model(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    stream = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(evaluation.ModelError, match="mxfp8: the loss is nan"):
        evaluation.predictions_and_loss(torch.compile(model, backend=mxfx.backend("mxfp8", target="reference")),
                                        evaluation.windows(stream, 64), 4, "mxfp8")


def test_a_loaded_checkpoint_runs_its_stored_codes_unless_told_otherwise(model_dir, tmp_path):
    """Before: the default backend quantized a loaded checkpoint's dequantized weights again (mxfp4_dual)."""
    loaded = checkpoint.load(checkpoint.quantize(model_dir, "mxfp8", tmp_path / "q"))
    default, stored = _logits(loaded, None), _logits(loaded, "modelslim")
    assert torch.equal(default[0], stored[0]) and {r.scheme for r in default[1].rewritten} == {"modelslim/mxfp8"}
    torch._dynamo.reset()
    with pytest.raises(Exception, match="loaded from a quantized checkpoint .W8A8_MXFP8.; scheme mxfp4_dual would "
                                        "quantize its dequantized values again"), torch.no_grad():
        torch.compile(loaded, backend=mxfx.backend("mxfp4_dual", target="reference"))(
            torch.zeros(1, 8, dtype=torch.long))
    torch._dynamo.reset()

"""Recovered checkpoints (`quantize(..., recipe=, calibration=)`): the recipe's codes, smoothing scales and
rotation written, read back (mxfx's layout and msmodelslim's wrapped one) and compiled to the online
recipe's logits bit for bit, with the same sharing and fusions; and every bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mxfx
from mxfx import checkpoint, cli, evaluation, recipes
from mxfx.calibrating import calibrate
from mxfx.calibration import CalibrationError
from mxfx.checkpoint import CheckpointError
from mxfx.recipes import Recipe
from mxfx.recovery.rotation import BlockRotation
from passes import FusionReport

from .. import msmodelslim
from ..compiled import compiled
from ..models import tiny_qwen3

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
Q = "model.layers.0.self_attn.q_proj"
SMOOTH_ROTATE = Recipe(smooth_alpha=0.5, rotation=BlockRotation(64, "random", seed=3))
CASES = [("mxfp4_dual", "rotate+gptq"), ("mxfp4_w4a8", "gptq"), ("mxfp4_dual", "smooth"), ("mxfp8", SMOOTH_ROTATE)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """GPTQ's many small factorizations and solves run ~10x faster on one thread on a shared machine (idle
    OpenMP threads spin); numerics are compared within the module, under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A one-layer Qwen3 as a bf16 Hugging Face folder (GPTQ runs twice per case: keep it small)."""
    folder = tmp_path_factory.mktemp("bf16")
    tiny_qwen3(layers=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16(model_dir):
    return evaluation.load_model(model_dir)


@pytest.fixture(scope="module")
def calibration(bf16):
    return calibrate(bf16, [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i))
                            for i in range(2)])


@pytest.fixture(scope="module")
def written(model_dir, calibration, tmp_path_factory):
    """scheme, recipe -> its checkpoint folder, written once per module."""
    folders = {}

    def write(scheme, recipe):
        key = (scheme, recipes.recipe_name(recipes.get_recipe(recipe, mxfx.schemes.SCHEMES[scheme])))
        if key not in folders:
            out = tmp_path_factory.mktemp("recovered") / "q"
            folders[key] = checkpoint.quantize(model_dir, scheme, out, recipe=recipe, calibration=calibration)
        return folders[key]

    return write


def _compiled(model, scheme):
    out, be = compiled(model, IDS, scheme=scheme)
    logits = out.logits
    sites = [[(site.linears, site.outcome, site.reason) for site in r.sites]
             for r in be.pipeline_reports[-1].get(FusionReport)]
    return logits, be.reports[-1], sites


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


@pytest.mark.parametrize("scheme, recipe", CASES, ids=lambda v: v if isinstance(v, str) else "smooth+random64")
def test_a_recovered_checkpoint_compiles_to_the_online_recipes_logits(bf16, calibration, written, scheme, recipe):
    out = written(scheme, recipe)
    selector = recipes.apply(scheme, recipe, calibration, bf16)
    expected, online, online_sites = _compiled(bf16, selector)
    loaded = checkpoint.load(out)
    got, report, sites = _compiled(loaded, None)  # the default backend: the stored codes
    assert torch.equal(got, expected)
    assert report.activation_quants == online.activation_quants == 4, "siblings keep sharing one quantization"
    assert sites == online_sites and any(s[1] == "fused" for s in sites[0]), "merges / fusions as online"

    r = recipes.get_recipe(recipe, mxfx.schemes.SCHEMES[scheme])
    steps = [step for step, on in (("smooth", r.smooth_alpha is not None), ("rotate", r.rotation)) if on]
    # a folded o_proj (Hadamard, no smoothing) is stored as plain codes: its rotation is in v_proj's rows
    folded = {f.o_proj for f in selector.folds.rotations if f.folded}
    assert bool(folded) == (r.rotation is not None and r.rotation.kind == "hadamard" and r.smooth_alpha is None)
    # a down_proj whose smoothing folds into up_proj's rows (where it is a multiply) is stored unsmoothed
    smoothed = {f.down_proj for f in selector.folds.smoothings if f.folded}
    assert bool(smoothed) == (r.smooth_alpha is not None and not recipes.smoothing_is_free(selector.base, r.rotation))
    assert {x.fqn: x.scheme for x in report.rewritten} == {
        x.fqn: f"modelslim/{scheme}" if x.fqn in folded else
        "+".join([f"modelslim/{scheme}", *(step for step in steps if x.fqn not in smoothed or step != "smooth")])
        for x in report.rewritten}
    stored = checkpoint.stored_weights(loaded)[Q]
    assert stored.rotation == r.rotation
    # the model holds the original weight W = W' A^T s (not the transformed codes), so it also runs eagerly
    w, original = loaded.get_parameter(f"{Q}.weight").float(), bf16.get_parameter(f"{Q}.weight").float()
    assert (w - original).norm() / original.norm() < 0.2


def test_the_smoothing_scale_and_rotation_entry_are_written_in_the_documented_layout(bf16, calibration, written):
    out = written("mxfp8", SMOOTH_ROTATE)
    description = json.loads((out / checkpoint.DESCRIPTION).read_text())
    tensors = load_file(out / "model.safetensors")
    online = recipes.apply("mxfp8", SMOOTH_ROTATE, calibration, bf16)
    for name in ("q_proj", "k_proj", "v_proj"):
        prefix = f"model.layers.0.self_attn.{name}"
        assert description[f"{prefix}.mul_scale"] == "FLOAT" and description[f"{prefix}.weight"] == "W8A8_MXFP8"
        scale = tensors[f"{prefix}.mul_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (512,)
        assert torch.equal(scale, online.scheme_for(bf16.get_parameter(f"{prefix}.weight")).smooth.tensor.float())
        assert torch.equal(scale, tensors[f"{Q}.mul_scale"]), "q/k/v: one scale"
    entry = description["optional"]["mxfx_rotation"]
    assert {key: entry[key] for key in ("block", "kind", "seed")} == {"block": 64, "kind": "random", "seed": 3}
    assert len(entry["linears"]) == 7 and set(entry["sha256"]) == {"512", "1536"}


def _wrap(folder):
    """mxfx's smoothed layout rewritten as msmodelslim's own export: p.div.mul_scale and p.linear.*."""
    description = json.loads((folder / checkpoint.DESCRIPTION).read_text())
    smoothed = {name.removesuffix(".mul_scale") for name in description if name.endswith(".mul_scale")}

    def rename(name):
        prefix, _, suffix = name.rpartition(".")
        if prefix not in smoothed:
            return name
        return f"{prefix}.div.mul_scale" if suffix == "mul_scale" else f"{prefix}.linear.{suffix}"

    msmodelslim.edit_tensors(folder, lambda t: t.update({rename(k): t.pop(k) for k in list(t)}))
    (folder / checkpoint.DESCRIPTION).write_text(json.dumps({rename(k): v for k, v in description.items()}))


def test_msmodelslims_wrapped_smoothing_export_reads_like_mxfxs_layout(written, tmp_path):
    out = written("mxfp4_dual", "smooth")
    expected, _, _ = _compiled(checkpoint.load(out), None)
    wrapped = _copy(out, tmp_path)
    _wrap(wrapped)
    assert f"{Q}.div.mul_scale" in load_file(wrapped / "model.safetensors")
    got, report, _ = _compiled(checkpoint.load(wrapped), None)
    assert torch.equal(got, expected) and {x.scheme for x in report.rewritten} == {"modelslim/mxfp4_dual+smooth"}

    msmodelslim.edit_tensors(wrapped, lambda t: t.update({f"{Q}.div.mul_scale": t[f"{Q}.div.mul_scale"][:256]}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: {Q}.div.mul_scale has shape \[256\], expected"):
        checkpoint.load(wrapped)


def test_bad_smoothing_tensors_are_refused_by_file_and_name(written, tmp_path):
    folder = _copy(written("mxfp4_dual", "smooth"), tmp_path)
    original = load_file(folder / "model.safetensors")

    def broken(change):
        tensors = dict(original)
        change(tensors)
        save_file(tensors, folder / "model.safetensors")
        return folder

    with pytest.raises(CheckpointError, match=rf"model.safetensors: {Q}.mul_scale has shape \[512, 1\], expected \["):
        checkpoint.load(broken(lambda t: t.update({f"{Q}.mul_scale": t[f"{Q}.mul_scale"].unsqueeze(1)})))
    zero = original[f"{Q}.mul_scale"].clone()
    zero[7] = 0
    with pytest.raises(CheckpointError, match=rf"{Q}.mul_scale holds 1 values that are not finite and positive "
                                              r"\(first at channel 7\)"):
        checkpoint.load(broken(lambda t: t.update({f"{Q}.mul_scale": zero})))
    with pytest.raises(CheckpointError, match=rf"{Q}.mul_scale is torch.int32"):
        checkpoint.load(broken(lambda t: t.update({f"{Q}.mul_scale": t[f"{Q}.mul_scale"].int()})))
    with pytest.raises(CheckpointError, match=rf"missing tensor {Q}.mul_scale \(in quant_model_description.json"):
        checkpoint.load(broken(lambda t: t.pop(f"{Q}.mul_scale")))
    broken(lambda t: None)
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*mul_scale: tensor parallelism of a smoothed"):
        checkpoint.load(folder, tp_rank=0, tp_size=2)


def test_bad_rotation_entries_are_refused(written, tmp_path):
    folder = _copy(written("mxfp4_dual", "rotate+gptq"), tmp_path)
    path = folder / checkpoint.DESCRIPTION
    original = json.loads(path.read_text())

    def describe(change):
        description = json.loads(json.dumps(original))
        change(description["optional"]["mxfx_rotation"])
        path.write_text(json.dumps(description))
        return folder

    with pytest.raises(CheckpointError, match="the hadamard blocks regenerated for K=512 differ"):
        checkpoint.load(describe(lambda e: e["sha256"].update({"512": "0" * 64})))
    with pytest.raises(CheckpointError, match="optional.mxfx_rotation names lm_head, which the checkpoint does not"):
        checkpoint.load(describe(lambda e: e["linears"].append("lm_head")))
    with pytest.raises(CheckpointError, match="not an mxfx rotation entry .*rotation block must be one of"):
        checkpoint.load(describe(lambda e: e.update(block=48)))
    with pytest.raises(CheckpointError, match="not an mxfx rotation entry .*'seed'"):
        checkpoint.load(describe(lambda e: e.pop("seed")))
    with pytest.raises(CheckpointError, match="optional.mxfx_rotation: tensor parallelism of a rotated"):
        checkpoint.load(describe(lambda e: None), tp_rank=1, tp_size=2)


def test_quantize_refuses_what_a_recipe_cannot_run(model_dir, calibration, tmp_path):
    with pytest.raises(ValueError, match="recipes apply to the online schemes mxfp4_dual, mxfp4_w4a8 and mxfp8, not "
                                         "mxfp4"):
        checkpoint.quantize(model_dir, "mxfp4", tmp_path / "a", recipe="rotate")
    with pytest.raises(ValueError, match="recipe gptq needs a calibration"):
        checkpoint.quantize(model_dir, "mxfp4_dual", tmp_path / "b", recipe="gptq")
    with pytest.raises(ValueError, match="a calibration serves a recipe"):
        checkpoint.quantize(model_dir, "mxfp4_dual", tmp_path / "c", calibration=calibration)
    other = calibrate(tiny_qwen3(layers=2), [IDS])
    with pytest.raises(CalibrationError, match="another model"):
        checkpoint.quantize(model_dir, "mxfp4_dual", tmp_path / "d", recipe="smooth", calibration=other)
    assert not any(tmp_path.iterdir()), "nothing written"


def test_quantize_refuses_a_rotation_that_does_not_divide_k(tmp_path):
    folder = tmp_path / "bf16"
    tiny_qwen3(layers=1, intermediate_size=1568).save_pretrained(folder)  # down_proj K = 1568 = 49 x 32
    with pytest.raises(ValueError, match="linear model.layers.0.mlp.down_proj: rotation block 64 does not divide "
                                         "K=1568"):
        checkpoint.quantize(folder, "mxfp8", tmp_path / "q", recipe=Recipe(rotation=BlockRotation(64)))
    assert not (tmp_path / "q").exists()


def test_cli_quantize_with_a_recipe(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(model_dir), "--scheme", "mxfp4_dual", "--recipe", "rotate",
                     "--out", str(out)]) == 0
    assert checkpoint.stored_weights(checkpoint.load(out))[Q].rotation == BlockRotation(32)
    assert "--recipe rotate" in (out / "README.md").read_text()
    assert cli.main(["quantize", "--model", str(model_dir), "--scheme", "mxfp4", "--recipe", "gptq",
                     "--out", str(tmp_path / "r")]) == 2
    assert "recipes apply to the online schemes" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", str(model_dir), "--scheme", "mxfp8", "--calibration", "cal.safetensors",
                     "--out", str(tmp_path / "s")]) == 2
    assert "serve --recipe or --scheme auto: give one" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_a_folded_rotation_with_biases_is_stored_as_plain_codes_and_reloads_bit_identically(tmp_path):
    """o_proj's rotation folded into v_proj: o_proj leaves the rotation entry, v_proj's bias is written rotated
    (b A, in bf16, as the online fold adds it), and the loaded checkpoint computes the online fold's logits."""
    folder = tmp_path / "bf16"
    model = tiny_qwen3(layers=1, attention_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    model.save_pretrained(folder)
    bf16 = evaluation.load_model(folder)
    selector = recipes.apply("mxfp4_dual", "rotate", None, bf16)
    assert [f.folded for f in selector.folds.rotations] == [True]
    out = checkpoint.quantize(folder, "mxfp4_dual", tmp_path / "q", recipe="rotate")
    expected, online, _ = _compiled(bf16, selector)
    got, report, _ = _compiled(checkpoint.load(out), None)
    assert torch.equal(got, expected)
    o, v = (f"model.layers.0.self_attn.{p}" for p in ("o_proj", "v_proj"))
    assert o not in json.loads((out / checkpoint.DESCRIPTION).read_text())["optional"]["mxfx_rotation"]["linears"]
    assert {r.fqn: r.scheme for r in report.rewritten}[o] == "modelslim/mxfp4_dual"
    bias = bf16.get_parameter(f"{v}.bias")
    stored = load_file(out / "model.safetensors")[f"{v}.bias"]
    assert torch.equal(stored, selector.scheme_for(bf16.get_parameter(f"{v}.weight")).output_bias(bias))
    assert not torch.equal(stored, bias)


def test_an_o_proj_fold_after_the_smoothing_search_is_written_and_reloads_bit_identically(
        model_dir, bf16, calibration, tmp_path, monkeypatch):
    """The writer decides o_proj's smoothing before the folds, as recipes.apply does: where the search chooses
    none for o_proj, its rotation folds into v_proj's rows in the checkpoint too (no smoothing nor rotation
    entry for o_proj) and the loaded checkpoint computes the online recipe's logits."""
    def search(base, recipe, stats, weights):  # a fixed choice per input: none for o_proj, 0.5 elsewhere
        o_proj = stats.members[0].endswith("o_proj")
        return None if o_proj else recipes.Constant(torch.full((stats.k,), 0.5, dtype=torch.bfloat16))

    monkeypatch.setattr(recipes, "searched_smooth", search)
    recipe = Recipe(smooth_alpha="search", rotation=BlockRotation(32))
    selector = recipes.apply("mxfp4_dual", recipe, calibration, bf16)
    assert [f.folded for f in selector.folds.rotations] == [True]
    out = checkpoint.quantize(model_dir, "mxfp4_dual", tmp_path / "q", recipe=recipe, calibration=calibration)
    expected, _, _ = _compiled(bf16, selector)
    got, report, _ = _compiled(checkpoint.load(out), None)
    assert torch.equal(got, expected)
    o = "model.layers.0.self_attn.o_proj"
    description = json.loads((out / checkpoint.DESCRIPTION).read_text())
    assert f"{o}.mul_scale" not in description and o not in description["optional"]["mxfx_rotation"]["linears"]
    assert {r.fqn: r.scheme for r in report.rewritten}[o] == "modelslim/mxfp4_dual"


def test_a_folded_down_proj_smoothing_is_written_into_up_projs_codes_and_reloads_bit_identically(tmp_path):
    """down_proj's smoothing folded into up_proj's rows (mxfp4_w4a8, where it is a multiply): up_proj's codes
    are those of its row-scaled weight and its bias is written scaled (b * s, in bf16, as the online fold adds
    it), down_proj has no mul_scale, and the loaded checkpoint computes the online fold's logits with the
    SwiGLU fused into down_proj's quantization, as online."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "bf16"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=1,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, mlp_bias=True,
                                         max_position_embeddings=256)).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    model.save_pretrained(folder)
    bf16 = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    calibration = calibrate(bf16, [IDS])
    selector = recipes.apply("mxfp4_w4a8", "smooth", calibration, bf16)
    assert [f.folded for f in selector.folds.smoothings] == [True]
    out = checkpoint.quantize(folder, "mxfp4_w4a8", tmp_path / "q", recipe="smooth", calibration=calibration)
    expected, _, online_sites = _compiled(bf16, selector)
    got, report, sites = _compiled(checkpoint.load(out), None)
    assert torch.equal(got, expected)
    assert sites == online_sites and (("model.layers.0.mlp.down_proj",), "fused", None) in sites[-1]
    up, down = (f"model.layers.0.mlp.{p}" for p in ("up_proj", "down_proj"))
    tensors = load_file(out / "model.safetensors")
    assert f"{down}.mul_scale" not in tensors and f"{up}.mul_scale" in tensors
    assert {r.fqn: r.scheme for r in report.rewritten}[down] == "modelslim/mxfp4_w4a8"
    scheme = selector.scheme_for(bf16.get_parameter(f"{up}.weight"))
    assert torch.equal(tensors[f"{up}.bias"], scheme.output_bias(bf16.get_parameter(f"{up}.bias")))
    assert not torch.equal(tensors[f"{up}.bias"], bf16.get_parameter(f"{up}.bias"))

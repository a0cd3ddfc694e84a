"""The command line's argument checks and error messages: every bad input is a usage error (exit 2)
that names the option or file and what is allowed, never a traceback."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from mxfx import cli, evaluation
from mxfx.dynamo_backend import Backend, MXFXCompileError

QUICK = ["--max-tokens", "512", "--new-tokens", "2"]


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A one-layer byte-level Qwen3 folder (random weights, 64 positions)."""
    folder = tmp_path_factory.mktemp("byte") / "model"
    config = Qwen3Config(vocab_size=257, hidden_size=512, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--seq", "0"], "argument --seq: 0 is not allowed: it must be an integer >= 1"),
        (["demo", "--seq", "-5"], "argument --seq: -5 is not allowed"),
        (["demo", "--max-tokens", "-300"], "argument --max-tokens: -300 is not allowed"),
        (["demo", "--new-tokens", "-1"], "argument --new-tokens: -1 is not allowed: it must be an integer >= 0"),
        (["demo", "--batch-size", "0"], "argument --batch-size: 0 is not allowed"),
        (["demo", "--seq", "ten"], "argument --seq: 'ten' is not an integer"),
        (["formats", "--rows", "-1"], "argument --rows: -1 is not allowed"),
    ],
)
def test_numbers_are_checked_before_anything_runs(capsys, argv, message):
    assert message in _usage_error(capsys, argv)


def test_version_and_every_option_shows_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("mxfx ")
    for command, expected in (("demo", ["(default: 256)", "(default: The with statement)", "(default: 40)"]),
                              ("formats", ["(default: 1024)"]), ("eval", ["(default: 8)", "first words"])):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert all(text in out for text in expected), (command, out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq", "128"], "--seq 128 is past the model's max_position_embeddings (64, "),
        (["--seq", "16", "--max-tokens", "8"], "--max-tokens 8 is less than one window (--seq 16)"),
        (["--seq", "16", "--prompt", "abc", "--new-tokens", "100"],
         "the prompt (3 tokens) plus --new-tokens 100 is past the model's max_position_embeddings (64, "),
    ],
)
def test_windows_and_continuations_must_fit_the_models_positions(byte_model, capsys, argv, message):
    assert cli.main(["eval", "--model", str(byte_model), "--scheme", "mxfp8", *argv]) == 2
    assert message in capsys.readouterr().err


def test_eval_batch_size_and_default_prompt_from_the_text(byte_model, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("Alpha beta gamma delta epsilon zeta eta theta iota kappa. " * 20)
    argv = ["eval", "--model", str(byte_model), "--scheme", "mxfp8", "--text", str(text), "--seq", "32",
            "--batch-size", "3", "--max-tokens", "200", "--new-tokens", "3"]
    assert cli.main(argv) == 0
    assert "greedy continuations of 'Alpha beta gamma delta epsilon zeta eta'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "is a file, not a model folder"),
        (lambda tmp: (tmp / "config.json").write_text("{bad") and tmp, "config.json: not valid JSON"),
        (lambda tmp: (tmp / "config.json").write_text("[1, 2]") and tmp, "config.json: model_type is None"),
    ],
)
def test_model_folder_errors_name_the_file(tmp_path, capsys, make, message):
    assert cli.main(["eval", "--model", str(make(tmp_path)), *QUICK]) == 2
    assert message in capsys.readouterr().err


def test_truncated_bf16_folder_and_binary_text(byte_model, tmp_path, capsys):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(byte_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for command in (["eval", "--model", str(truncated), *QUICK], ["quantize", "--model", str(truncated), "--scheme",
                                                                  "mxfp8", "--out", str(tmp_path / "q")]):
        assert cli.main(command) == 2
        assert "model.safetensors" in (err := capsys.readouterr().err) and "truncated or corrupt" in err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)))
    assert cli.main(["eval", "--model", str(byte_model), "--text", str(binary), *QUICK]) == 2
    assert f"--text {binary} is not UTF-8 text" in capsys.readouterr().err


def test_inspect_reports_a_failure_after_the_rewrite_instead_of_hiding_it(byte_model, monkeypatch, capsys):
    rewrite = Backend.rewrite

    def fails_after_reporting(self, gm, example_inputs):
        rewrite(self, gm, example_inputs)  # the report is appended
        raise MXFXCompileError("K must be static")

    monkeypatch.setattr(Backend, "rewrite", fails_after_reporting)
    assert cli.main(["inspect", "--model", str(byte_model), "--scheme", "mxfp8"]) == 1
    assert "K must be static" in capsys.readouterr().err


def test_a_checkpoint_refuses_an_explicit_scheme(byte_model, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(byte_model), "--scheme", "mxfp8", "--out", str(out)]) == 0
    assert cli.main(["inspect", "--model", str(out), "--scheme", "mxfp4_dual"]) == 2
    assert ("is a quantized checkpoint, which runs with its stored scheme (modelslim); drop --scheme mxfp4_dual"
            in capsys.readouterr().err)
    assert cli.main(["inspect", "--model", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "modelslim/mxfp8" in printed
    # the fusions, per site: the stored codes merge, the norms fuse with their quantizations
    assert "merge_siblings: 2 fused" in printed and "q_proj+k_proj+v_proj  model.layers.0.self_attn  fused" in printed
    assert "fuse_norm_quant: 2 fused" in printed and "npu_add_rms_norm_dynamic_mx_quant" in printed


def test_continuation_reads_the_whole_sequence_through_the_evaluations_graph(byte_model):
    from torch._dynamo.utils import counters

    import mxfx

    model = evaluation.load_model(byte_model)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].clone()))
    tokens = evaluation.continuation(model, [1, 2, 3], 5, end=None)
    hook.remove()
    assert [list(c.shape) for c in calls] == [[2, 3 + i] for i in range(5)], "one forward of it all per token"
    assert all(c[0].tolist() == c[1].tolist() == [1, 2, 3, *tokens[:i]] for i, c in enumerate(calls))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"), dynamic=True, fullgraph=True)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (4, 32)))  # what the evaluation compiles: its windows
    for new_tokens in (3, 12):
        evaluation.continuation(compiled, [1, 2, 3], new_tokens, end=None)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == 1, "the continuation compiles no graph of its own"


def test_the_evaluation_and_its_continuation_share_one_graph(byte_model):
    """The evaluation's windows reach the graph as tensors of their own, as the continuation's do: a view
    would make Dynamo guard its base and compile the continuation a second graph (seconds per scheme)."""
    from torch._dynamo.utils import counters

    model = evaluation.load_model(byte_model)
    stream = torch.randint(0, 256, (4 * 33 + 1,), generator=torch.Generator().manual_seed(0))
    counters.clear()
    result = evaluation.evaluate(model, stream, ["mxfp8"], seq=32, batch_size=4, prompt=[1, 2, 3], new_tokens=4)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert len(result.results[0].continuation) == 4
    assert graphs == 1


def test_recipes_run_next_to_plain_rounding_from_a_calibration_file(byte_model, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("Alpha beta gamma delta epsilon zeta eta theta iota kappa. " * 20)
    calibration = tmp_path / "calibration.safetensors"
    argv = ["calibrate", "--model", str(byte_model), "--out", str(calibration), "--calibration-text", str(text),
            "--seq", "32"]
    assert cli.main(argv) == 0
    assert f"calibrated on {(len(text.read_text()) // 32) * 32:,} tokens of {text}" in capsys.readouterr().out
    argv = ["eval", "--model", str(byte_model), "--scheme", "mxfp4_w4a8", "mxfp8", "--recipe", "none", "gptq",
            "recommended", "--calibration", str(calibration), "--text", str(text), "--seq", "32", "--max-tokens",
            "64", "--new-tokens", "0"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("mxfp")]
    # each scheme plain, then its recipes, each once (mxfp8's recommended recipe is gptq)
    assert rows == ["mxfp4_w4a8", "mxfp4_w4a8+gptq", "mxfp4_w4a8+smooth-search+gptq", "mxfp8", "mxfp8+gptq"]
    assert cli.main(["inspect", "--model", str(byte_model), "--scheme", "mxfp4_dual", "mxfp4", "--recipe",
                     "rotate", "recommended", "--calibration", str(calibration)]) == 0
    out = capsys.readouterr().out
    assert "mxfx rewrite: scheme mxfp4_dual+rotate," in out and "scheme mxfp4_dual+smooth-search+rotate+gptq," in out
    assert "mxfp4: recipes serve mxfp4_dual, mxfp4_w4a8 and mxfp8 only; it runs plain for --recipe rotate" in out
    assert "mxfx rewrite: scheme mxfp4," in out and "scheme mxfp4_dual," not in out


def test_recipe_inputs_that_cannot_serve_are_refused_by_name(byte_model, tmp_path, capsys):
    other = tmp_path / "other"
    config = Qwen3Config(vocab_size=257, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(other)
    calibration = tmp_path / "other.safetensors"
    assert cli.main(["calibrate", "--model", str(other), "--out", str(calibration), "--seq", "32",
                     "--calibration-tokens", "64"]) == 0
    base = ["eval", "--model", str(byte_model), "--scheme", "mxfp4_dual", "--seq", "32", *QUICK]
    assert cli.main([*base, "--recipe", "gptq", "--calibration", str(calibration)]) == 2
    assert "the calibration is for another model: linear model.layers.0.self_attn.q_proj" in capsys.readouterr().err
    assert cli.main([*base, "--recipe", "gptq", "--calibration-tokens", "16"]) == 2
    assert "--calibration-tokens is 16: less than one window (--seq 32)" in capsys.readouterr().err
    checkpoint = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(byte_model), "--scheme", "mxfp8", "--out", str(checkpoint)]) == 0
    assert cli.main(["eval", "--model", str(checkpoint), "--recipe", "gptq", "--seq", "32", *QUICK]) == 2
    assert "is a quantized checkpoint: its codes are fixed, so --recipe gptq cannot apply" in capsys.readouterr().err
    for recipe in (["--scheme", "mxfp8+gptq"], ["--scheme", "mxfp8", "--recipe", "rotate"]):  # not silently dropped
        assert cli.main(["inspect", "--model", str(byte_model), "--tp", "2", *recipe]) == 2
        assert "recipes (" in capsys.readouterr().err

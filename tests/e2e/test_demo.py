"""The main job on the shipped model (quick paths): the model itself, `mxfx demo / eval / inspect`,
their measurements and their errors."""

import json
import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from mxfx import cli, evaluation, textdata

QUICK = ["--max-tokens", "2048", "--new-tokens", "8"]


def test_held_out_split_is_fixed_and_disjoint():
    train, held_out = textdata.split()
    assert len(held_out) == 9 and not set(train) & set(held_out)
    assert held_out[0] == sorted(train + held_out)[7]
    stream = textdata.tokens(held_out[:2])
    assert ((stream == textdata.END_OF_TEXT).sum() == 2
            and textdata.decode(stream[:20].tolist()) == textdata.texts(held_out)[0][:20])


def test_shipped_model_is_a_trained_qwen3(record_property):
    model = evaluation.load_model(evaluation.SHIPPED_MODEL)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (512, 1536, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 64)
    batches = evaluation.windows(textdata.tokens(textdata.split()[1]), 256, max_tokens=4096)
    _, loss = evaluation.predictions_and_loss(model, batches, 8, "bf16")
    record_property("measured", f"shipped model held-out perplexity (the first 4,096 held-out tokens, bf16; "
                                f"the README's 4.67 is on all 36,096): {math.exp(loss):.2f}")
    assert math.exp(loss) < 10, "far below the untrained model's ~252"


def test_perplexities_are_finite_and_ordered():
    model = evaluation.load_model(evaluation.SHIPPED_MODEL)
    result = evaluation.evaluate(model, textdata.tokens(textdata.split()[1]), ["mxfp8", "mxfp4_w4a8", "mxfp4_dual"],
                                 max_tokens=2048)
    ppl = {r.scheme: r.perplexity for r in result.results}
    assert all(math.isfinite(p) for p in [result.bf16_perplexity, *ppl.values()])
    assert (result.bf16_perplexity <= ppl["mxfp8"] * 1.01
            and ppl["mxfp8"] <= min(ppl["mxfp4_w4a8"], ppl["mxfp4_dual"]) * 1.01)
    for r in result.results:
        assert len(r.report.rewritten) == 28 and len(r.layer_sqnr) == 28
    sqnr = {r.scheme: sum(r.layer_sqnr.values()) / 28 for r in result.results}
    assert sqnr["mxfp8"] > sqnr["mxfp4_w4a8"] > sqnr["mxfp4_dual"] > 15


def test_demo_command(capsys):
    assert cli.main(["demo", *QUICK]) == 0
    out = capsys.readouterr().out
    assert "28 rewritten, 1 skipped, 16 activation quantizations" in out
    for scheme in ("bf16", "mxfp4_dual", "mxfp4_w4a8", "mxfp8", "per-layer output SQNR", "greedy continuations"):
        assert scheme in out


def test_inspect_command(capsys):
    assert cli.main(["inspect", "--model", str(evaluation.SHIPPED_MODEL), "--scheme", "mxfp8"]) == 0
    assert "28 rewritten" in capsys.readouterr().out


def _folder(tmp_path, **config):
    folder = tmp_path / "model"
    (Qwen3ForCausalLM(Qwen3Config(vocab_size=257, num_hidden_layers=1, **config))
     .to(torch.bfloat16).save_pretrained(folder))
    return folder


def test_eval_a_model_whose_k_matches_no_scheme_reports_instead_of_crashing(tmp_path, capsys):
    folder = _folder(tmp_path, hidden_size=80, intermediate_size=160, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=40)
    assert cli.main(["eval", "--model", str(folder), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "K=80 is not a multiple of 512 (mxfp4_dual)" in out and "nothing rewritten" in out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "absent", "does not exist"),
        (lambda tmp: tmp, "has no config.json"),
        (lambda tmp: (tmp / "config.json").write_text(json.dumps({"model_type": "llama"})) and tmp,
         "model_type is 'llama'"),
    ],
)
def test_eval_errors(tmp_path, capsys, make, message):
    assert cli.main(["eval", "--model", str(make(tmp_path)), *QUICK]) == 2
    assert message in capsys.readouterr().err


def test_plot_writes_a_png_or_says_it_needs_matplotlib(tmp_path):
    png = tmp_path / "sqnr.png"
    command = ["eval", "--model", str(evaluation.SHIPPED_MODEL), "--scheme", "mxfp8", "--plot", str(png), *QUICK]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="matplotlib"):
            cli.main(command)
        return
    assert cli.main(command) == 0 and png.stat().st_size > 0


def test_serve_graph_mode_example(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "serve_graph_mode.py"
    monkeypatch.setattr("sys.argv",
                        [str(example), "--buckets", "1", "2", "--new-tokens", "4", "--schemes", "mxfp4_dual"])
    recompile_limit = torch._dynamo.config.recompile_limit
    try:
        runpy.run_path(str(example), run_name="__main__")
    finally:
        torch._dynamo.config.recompile_limit = recompile_limit
        torch._dynamo.config.fail_on_recompile_limit_hit = False
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "no recompiles after warm-up" in out and out.count("mxfp4_dual") == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--schemes", "nope"], "argument --schemes: invalid choice: 'nope'"),
        (["--buckets", "0"], "argument --buckets: 0 is not allowed: it must be an integer >= 1"),
        (["--new-tokens", "0"], "argument --new-tokens: 0 is not allowed: it must be an integer >= 2"),
        (["--model", "/nonexistent"], "model folder /nonexistent does not exist"),
    ],
)
def test_serve_graph_mode_example_checks_its_arguments_first(monkeypatch, capsys, argv, message):
    import runpy
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "serve_graph_mode.py"
    monkeypatch.setattr("sys.argv", [str(example), *argv])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(example), run_name="__main__")
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_continuations_are_greedy_decoding():
    """At every step the continuation picks the token that one forward of the final sequence ranks first, up
    to what the sequence's length and the batch of two change in the bf16 arithmetic (a near-tie may go
    either way)."""
    import mxfx

    model = evaluation.load_model(evaluation.SHIPPED_MODEL)
    prompt = textdata.encode("The with statement")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"), dynamic=True, fullgraph=True)
    for step in (model, compiled):
        tokens = evaluation.continuation(step, prompt, 40, end=None)
        with torch.no_grad():
            logits = step(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
        chosen, best = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0], logits.max(-1).values
        assert len(tokens) == 40 and (chosen >= best - 0.25).all()
        assert (chosen == best).float().mean() >= 0.9
    torch._dynamo.reset()


def test_formats_command_reports_each_format(capsys):
    from mxfx import cli

    assert cli.main(["formats", "--rows", "8", "--cols", "1024"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("input: torch.bfloat16 [8, 1024]") and lines[1].split()[:2] == ["format", "size"]
    bits = {line.split("  ")[0]: line.split()[-5] for line in lines[2:]}
    assert bits == {"mxfp8 (E4M3, E8M0/32)": "8.2500", "mxfp4 (E2M1, E8M0/32)": "4.2500",
                    "dual-level (E2M1, E8M0/32, FP32/512)": "4.3125"}

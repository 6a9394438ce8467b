"""`rlvg pretrain|sample|eval|train`: outputs on the shipped models and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reference_impls.cli import main

RLVG = [sys.executable, "-m", "reference_impls.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RLVG, *args], capture_output=True, text=True, timeout=300)


def run_in_process(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``main`` as the command calls it, in this process: (exit code, stdout, stderr).

    argparse's own exits (--help, an invalid choice) come back as their code. A new process per case cost
    about 8 s of imports; one test below still runs the real command to check its exit status.
    """
    try:
        code = main(list(args))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("model,sampler", [("shapes-diffusion", "ddim"), ("shapes-flow", "ode")])
def test_sample_writes_a_grid_and_reports_the_evaluator(model, sampler, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["sample", "--model", model, "--prompt", "two red circles", "--n", "4", "--sampler", sampler,
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.exists() and out.stat().st_size > 0
    assert report["prompt"] == "two red circles" and 0.0 <= report["evaluator"]["accuracy"] <= 1.0


def test_eval_reports_per_criterion_accuracy(capsys):
    assert main(["eval", "--model", "shapes-diffusion", "--n", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"accuracy", "count", "colour", "shape"} <= set(report)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["sample", "--model", "no/such/model", "--prompt", "a red circle", "--out", "x.png"], "not a shipped name"),
        (["sample", "--model", "shapes-diffusion", "--prompt", "a purple circle", "--out", "x.png"], "purple"),
        (["sample", "--model", "shapes-diffusion", "--prompt", "a red circle", "--sampler", "sde", "--out", "x.png"],
         "valid samplers: ddim, ddpm"),
        (["eval", "--model", "shapes-flow", "--split", "validation"], "valid splits"),
        (["train", "ddpo", "--reward", "aesthetics"], "Valid rewards"),
        (["train", "ddpo", "--preset", "laptop"], "valid presets"),
        (["train", "ddpo", "--model", "shapes-diffusion", "--steps", "0"], "--steps must be >= 1"),
        (["compare", "--base", "shapes-flow", "--model", "shapes-diffusion"], "same sampler"),
        (["compare", "--base", "shapes-flow", "--model", "shapes-flow", "--split", "dev"], "valid splits"),
        (["compare", "--base", "shapes-flow", "--model", "shapes-flow", "--reward", "beauty"], "Valid rewards"),
        (["compare", "--base", "shapes-flow", "--model", "shapes-flow", "--samples-per-prompt", "0"], ">= 1"),
        (["compare", "--base", "shapes-flow", "--model", "shapes-flow", "--sampler", "ddim"],
         "valid samplers: sde, cps, ode"),
        (["compare", "--base", "shapes-flow", "--model", "shapes-flow", "--stochastic-steps", "3"], "need --sampler"),
        (["compare", "--base", "shapes-flow", "--model", "shapes-flow", "--sampler", "sde", "--steps", "4",
          "--stochastic-steps", "5"], "between 0 and --steps 4"),
        (["pretrain", "--model", "flow", "--init-from", "no/such/folder", "--out", "x.png"], "no such checkpoint"),
        (["pretrain", "--model", "flow", "--prompts", "train,train-colour", "--out", "x.png"], "train-color_attr"),
        (["pretrain", "--model", "diffusion", "--time-shift", "3", "--out", "x.png"], "--model flow only"),
    ],
)
def test_bad_input_exits_2_with_what_is_allowed(args, expected, tmp_path, capsys):
    code, _, err = run_in_process(capsys, *[a if a != "x.png" else str(tmp_path / "x.png") for a in args])
    assert code == 2, err
    assert expected in err, err


def test_compare_prints_paired_rows_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["compare", "--base", "shapes-flow", "--model", "shapes-flow", "--split", "train", "--n", "4",
                 "--steps", "4", "--reward", "shapes-composition", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "paired comparison" in text and "no effect" in text and "task_mean" in text
    report = json.loads(out.read_text())
    assert report["n_prompts"] == 4 and report["samples_per_prompt"] == 2
    assert report["rows"]["accuracy"]["diff"] == 0.0 and report["rows"]["reward"]["ci_high"] == 0.0


def test_compare_on_a_stochastic_sampler_is_still_paired(tmp_path, capsys):
    # A model against itself on the SDE: zero difference only if both draw the same noise at every step.
    out = tmp_path / "report.json"
    assert main(["compare", "--base", "shapes-flow", "--model", "shapes-flow", "--split", "train", "--n", "6",
                 "--steps", "4", "--sampler", "sde", "--stochastic-steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["sampler"] == "sde" and report["settings"]["stochastic_steps"] == 2
    assert all(row["diff"] == 0.0 for row in report["rows"].values())


def test_the_command_exits_2_on_bad_input_without_a_traceback(tmp_path: Path):
    """The real process: its exit status, and a message instead of a traceback."""
    result = run_cli("eval", "--model", str(tmp_path))
    assert result.returncode == 2 and "is not a model folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_method_exits_2_and_lists_methods(capsys):
    code, _, err = run_in_process(capsys, "train", "ddpoo")
    assert code == 2
    assert "ddpo" in err and "invalid choice" in err


def test_train_help_documents_method_flags(capsys):
    code, out, _ = run_in_process(capsys, "train", "ddpo", "--help")
    assert code == 0
    assert "--clip-range" in out and "PPO clip epsilon" in out


@pytest.mark.parametrize("command", [[], ["compare"], ["eval"], ["cite"], ["catalog"], ["bench"], ["pretrain"]])
def test_every_help_page_renders(command: list[str], capsys):
    # argparse formats help strings with %, so one stray "95%" breaks `rlvg --help` for everybody.
    code, out, err = run_in_process(capsys, *command, "--help")
    assert code == 0, err
    assert "usage: rlvg" in out


def test_pretrain_data_mix_draws_each_split_equally_and_keeps_the_single_split_stream() -> None:
    import numpy as np

    from reference_impls.models.pretrain import _draw_prompts
    from reference_impls.worlds import prompt_split

    train, position = prompt_split("train"), prompt_split("train-position")
    single = _draw_prompts([train], 50, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    assert single == [train[i] for i in rng.integers(0, len(train), 50)]  # what runs before the option drew
    mixed = _draw_prompts([train, position], 4000, np.random.default_rng(0))
    share = np.mean([p in set(position) for p in mixed])
    expected = 0.5 + 0.5 * len(position) / len(train)  # half from position, plus train's own position share
    assert abs(share - expected) < 0.03


def test_pretrain_snapshots_are_loadable_checkpoints(tmp_path) -> None:
    from reference_impls.models.loading import load_policy

    out = tmp_path / "snap"
    assert main(["pretrain", "--model", "flow", "--steps", "3", "--save-every", "2", "--batch-size", "2",
                 "--eval-n", "2", "--threads", "1", "--out", str(out)]) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["steps_done"] == 3 and "snapshot" not in provenance
    assert load_policy(str(out)).kind == "flow"


def test_coordinate_channels_hold_x_and_y_and_survive_a_save_and_load(tmp_path) -> None:
    import torch

    from reference_impls.models.components import TinyModelConfig, coordinate_maps
    from reference_impls.models.policy import Conditioning
    from reference_impls.models.shapes_model import (
        build_shapes_policy,
        load_shapes_policy,
        save_shapes_policy,
    )

    maps = coordinate_maps(torch.zeros(2, 3, 4, 5))
    assert maps.shape == (2, 2, 4, 5)
    assert maps[0, 0, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]  # x runs left to right along a row
    assert maps[0, 1, :, 0].tolist() == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])  # y runs top to bottom
    config = TinyModelConfig(coordinate_channels=True)
    policy = build_shapes_policy("flow", config, seed=0)
    assert policy.denoiser.config.in_channels == 5
    save_shapes_policy(policy, tmp_path / "coord", config)
    loaded = load_shapes_policy(tmp_path / "coord")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500.0, 500.0])
    cond = Conditioning(torch.zeros(2, 4, config.text_hidden_size))
    with torch.no_grad():
        expected = policy.call_denoiser(policy.denoiser, x, t, cond)
        assert expected.shape == x.shape
        assert torch.equal(loaded.call_denoiser(loaded.denoiser, x, t, cond), expected)


def test_time_shift_keeps_the_endpoints_and_moves_training_to_high_noise() -> None:
    import torch

    from reference_impls.models.pretrain import shifted_noise_level

    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shifted_noise_level(s, 1.0), s)
    assert shifted_noise_level(s, 3.0).tolist() == pytest.approx([0.0, 0.5, 0.75, 1.0])  # 3s / (1 + 2s)

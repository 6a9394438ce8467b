"""The shared loop: run-directory contract, atomic checkpoints, resume, non-finite stop, config flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_policy

from reference_impls.algorithms import METHODS, UnknownMethodError, get_method
from reference_impls.models.shapes_model import save_shapes_policy
from reference_impls.rewards import UnknownRewardError, get_reward
from reference_impls.training import NonFiniteLossError, build_config, field_docs, train
from reference_impls.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "model"
    save_shapes_policy(tiny_policy("diffusion"), directory, TINY)
    return directory


def _ddpo(model_dir: Path, **overrides):  # noqa: ANN202
    from reference_impls.models import load_policy

    cls = get_method("ddpo")
    settings = {"preset": "smoke", "model": str(model_dir), "reward": "jpeg-compressibility", "steps": 2,
                "batch_size": 4, "num_steps": 4, "minibatch_size": 4, "eval_prompts": 4, **overrides}
    config = build_config(cls.config_class, cls.presets, settings)
    return cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config)


def test_run_directory_contract(tiny_model_dir, tmp_path):
    records = train(_ddpo(tiny_model_dir, checkpoint_every=1), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "ddpo" and config["steps"] == 2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    assert [r["step"] for r in lines] == [0, 1, 2]
    for record in lines[1:]:
        assert {"step", "reward_mean", "reward_std", "wall_s", "approx_kl", "clipfrac", "ratio_mean"} <= set(record)
    assert "eval_accuracy" in lines[0] and "eval_accuracy" in lines[-1]
    assert (run / "samples" / "step_000000.png").exists() and (run / "samples" / "step_000002.png").exists()
    assert latest_checkpoint(run / "checkpoints").name == "step_000002"
    assert (run / "final" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_existing_run_is_not_overwritten_without_resume(tiny_model_dir, tmp_path):
    train(_ddpo(tiny_model_dir, steps=1), tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_ddpo(tiny_model_dir, steps=1), tmp_path / "run", progress=False)


def test_resume_refuses_changed_settings(tiny_model_dir, tmp_path):
    train(_ddpo(tiny_model_dir, steps=1, checkpoint_every=1), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        train(_ddpo(tiny_model_dir, steps=2, learning_rate=1.0), tmp_path / "run", resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    method = _ddpo(tiny_model_dir, steps=4, checkpoint_every=1)
    original = method.train_step

    def poisoned(ctx):  # noqa: ANN001, ANN202
        metrics = original(ctx)
        if ctx.step == 2:
            metrics["approx_kl"] = float("nan")
        return metrics

    monkeypatch.setattr(method, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint") as error:
        train(method, tmp_path / "run", progress=False)
    assert "step_000002" in str(error.value)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000002"


def test_checkpoint_round_trip_restores_weights_and_optimiser(tmp_path):
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 7, module, optimizer, {"note": "x"})
    # a half-written folder from a killed run must not be picked up
    (tmp_path / ".step_000008.partial").mkdir()
    assert latest_checkpoint(tmp_path) == path
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_checkpoint(path, fresh, fresh_optimizer)
    assert state == {"step": 7, "note": "x"}
    assert torch.equal(fresh.weight, module.weight)
    exp_avg = optimizer.state[module.weight]["exp_avg"]
    assert torch.equal(fresh_optimizer.state[fresh.weight]["exp_avg"], exp_avg)
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.bin"))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownMethodError, match="Valid methods: .*ddpo"):
        get_method("ddpoo")
    with pytest.raises(UnknownRewardError, match="Valid rewards: .*jpeg-compressibility"):
        get_reward("jpeg-compress")


def test_every_method_documents_every_flag():
    for name, cls in METHODS.items():
        docs = field_docs(cls.config_class)
        missing = [f for f in cls.config_class.__dataclass_fields__ if f not in docs]
        assert not missing, f"{name}: fields without a docstring: {missing}"
        assert set(cls.presets) >= {"smoke", "cpu", "gpu"}, name
        assert cls.bib_key, name


def test_preset_then_flags_precedence():
    cls = get_method("ddpo")
    config = build_config(cls.config_class, cls.presets, {"preset": "cpu", "steps": 3})
    assert config.steps == 3 and config.batch_size == cls.presets["cpu"]["batch_size"]
    with pytest.raises(ValueError, match="valid presets: smoke, cpu, gpu"):
        build_config(cls.config_class, cls.presets, {"preset": "laptop"})

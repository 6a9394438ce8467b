"""Data-parallel training: two gloo processes compute what one process computes, and resume.

The runs go through the user's command (``rlvg train ... --num-processes 2``, which launches through
``accelerate launch``) and are compared record by record with the same command in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_policy

from reference_impls.sampling import SamplerConfig, rollout
from reference_impls.training.distributed import SINGLE_PROCESS

SMALL = ["--steps", "2", "--batch-size", "8", "--minibatch-size", "4", "--num-steps", "4", "--eval-prompts", "4",
         "--threads", "1", "--no-progress", "--checkpoint-every", "1"]
SETTINGS = {"flow-grpo": ["--group-size", "4"], "ddpo": ["--inner-epochs", "2"]}


def _train(method: str, out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "reference_impls.cli", "train", method, "--preset", "smoke", *SMALL,
               *SETTINGS[method], "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_records(single: list[dict], multi: list[dict]) -> None:
    assert [r["step"] for r in multi] == [r["step"] for r in single]
    for one, two in zip(single, multi):
        numbers = {k for k, v in one.items() if isinstance(v, float) and k != "wall_s" and not k.startswith("time")}
        assert numbers <= two.keys()
        for key in numbers:
            assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-5), (one["step"], key)


# Flow-GRPO's two-process run is compared record by record in the resume test below, which covers both.
@pytest.mark.parametrize("method", ["ddpo"])
def test_two_processes_give_the_single_process_metrics(method: str, tmp_path: Path) -> None:
    single = _train(method, tmp_path / "one")
    multi = _train(method, tmp_path / "two", "--num-processes", "2")
    assert multi[1]["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    _assert_same_records(single, multi)
    assert (tmp_path / "two" / "final" / "unet").is_dir()


def test_a_two_process_run_resumes(tmp_path: Path) -> None:
    """Flow-GRPO in two processes, stopped after step 1 and resumed: every record equals one process's run."""
    single = _train("flow-grpo", tmp_path / "one")
    _train("flow-grpo", tmp_path / "two", "--num-processes", "2", "--steps", "1")
    resumed = _train("flow-grpo", tmp_path / "two", "--num-processes", "2", "--resume")
    assert resumed[1]["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    _assert_same_records(single, resumed)
    assert (tmp_path / "two" / "final" / "unet").is_dir()


def test_a_method_without_data_parallel_support_is_refused(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "reference_impls.cli", "train", "diffusion-dpo", "--preset", "smoke",
               "--num-processes", "2", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "runs in one process only" in done.stderr and "flow-grpo" in done.stderr


def test_blocks_of_a_rollout_are_the_rows_of_the_whole_rollout() -> None:
    """Each process samples its block with every random draw made for the whole batch."""
    torch.set_num_threads(1)
    for kind, sampler in (("flow", SamplerConfig("sde", num_steps=4)), ("diffusion", SamplerConfig("ddim", num_steps=4))):
        policy = tiny_policy(kind)
        prompts = ["a red circle", "a blue square", "a green triangle", "two red circles"]
        whole = rollout(policy, prompts, sampler, torch.Generator().manual_seed(3))
        blocks = [rollout(policy, prompts, sampler, torch.Generator().manual_seed(3), rows=slice(k, k + 2))
                  for k in (0, 2)]
        assert [p for b in blocks for p in b.prompts] == prompts
        torch.testing.assert_close(torch.cat([b.states for b in blocks]), whole.states, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(torch.cat([b.log_probs for b in blocks]), whole.log_probs, atol=1e-4, rtol=1e-4)


def test_an_uneven_split_names_the_multiple_to_use() -> None:
    from reference_impls.training.distributed import Distributed

    class TwoProcesses:
        num_processes, process_index = 2, 1

    assert Distributed(TwoProcesses()).block(8) == slice(4, 8)
    with pytest.raises(ValueError, match="multiple of 2"):
        Distributed(TwoProcesses()).block(7, "minibatch")
    assert SINGLE_PROCESS.block(7) == slice(0, 7)

"""Data-parallel training across processes, on accelerate.

One run, N processes, one global batch. Every process draws the same prompts and the same noise (the
randomness comes from (seed, step), see ``step_context``) and samples only its own block of the batch;
the scored blocks are then gathered so that every process holds the whole batch, and group statistics,
advantages and per-prompt baselines are computed over all of it. In the update each minibatch is split
the same way: a process backpropagates its block, and the gradients are averaged over processes before
the single optimiser step every process takes. The main process alone writes metrics, samples and
checkpoints.

With equal blocks, the mean of the processes' mean losses is the mean loss of the whole minibatch, so N
processes compute the update one process would (to float rounding): the tests check exactly that.

Launch with ``rlvg train METHOD ... --num-processes N`` or ``accelerate launch -m reference_impls.cli
train METHOD ...``; on CPU the processes talk through gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from reference_impls.models.policy import Conditioning
from reference_impls.sampling.rollout import Trajectory


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run; ``accelerator`` is None when the run has one process."""

    accelerator: Any = None

    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else int(self.accelerator.process_index)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, n: int, what: str = "batch") -> slice:
        """This process's contiguous block of ``n`` rows (``n`` must split evenly)."""
        if n % self.world_size:
            raise ValueError(f"the {what} of {n} does not split over {self.world_size} processes; "
                             f"choose a multiple of {self.world_size}")
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Blocks of every process, concatenated in rank order along dim 0."""
        if not self.enabled:
            return tensor
        return self.accelerator.gather(tensor.contiguous())

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over processes: one all-reduce of one flat buffer."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for parameter, grad in zip(parameters, grads):
            size = grad.numel()
            parameter.grad = flat[offset : offset + size].view_as(grad).clone()
            offset += size

    def average_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean over processes of every number (each process reports means over equal blocks)."""
        if not self.enabled:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        values = self.accelerator.reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64),
                                         reduction="mean")
        return {**metrics, **{k: float(v) for k, v in zip(keys, values)}}

    def wait(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()


SINGLE_PROCESS = Distributed()


def launched_by_accelerate() -> bool:
    """True inside ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(cpu: bool) -> Distributed:
    """The run's process group when launched with several processes, else the single-process stand-in."""
    if not launched_by_accelerate():
        return SINGLE_PROCESS
    from accelerate import Accelerator

    return Distributed(Accelerator(cpu=cpu))


def gather_trajectory(trajectory: Trajectory, prompts: list[str], distributed: Distributed) -> Trajectory:
    """Every process's block of a batch, as the whole batch (``prompts``: the batch's prompts in order)."""
    if not distributed.enabled:
        return trajectory

    def gather_conditioning(cond: Conditioning | None) -> Conditioning | None:
        if cond is None:
            return None
        pooled = None if cond.pooled is None else distributed.gather(cond.pooled)
        return Conditioning(distributed.gather(cond.hidden_states), pooled)

    step_stds = trajectory.step_stds
    if step_stds is not None:
        step_stds = distributed.gather(step_stds[None]).amax(dim=0)
    return replace(
        trajectory,
        prompts=list(prompts),
        states=distributed.gather(trajectory.states),
        log_probs=distributed.gather(trajectory.log_probs),
        cond=gather_conditioning(trajectory.cond),  # type: ignore[arg-type]
        uncond=gather_conditioning(trajectory.uncond),
        images=distributed.gather(trajectory.images),
        step_stds=step_stds,
    )

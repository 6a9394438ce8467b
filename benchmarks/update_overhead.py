"""Cost of a policy-gradient update step against a bare forward+backward of the same model.

One DDPO-style minibatch update (recompute the stored transitions' log-probs at the sampled timesteps,
PPO-clipped loss, backward, clip, optimiser step) against ``unet(x_t, t, c).mean().backward()`` plus the
same optimiser step, on the same batch, timesteps and conditioning. Measured interleaved in one run and
reported as a ratio (target: 1.15 or less).

    python -m benchmarks.update_overhead [--quick]
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import format_table, machine_description, time_interleaved, write_results
from reference_impls.algorithms.estimators import ppo_clip_loss
from reference_impls.models.shapes_model import build_shapes_policy
from reference_impls.sampling import SamplerConfig, rollout, transition_log_prob


def measure(kind: str, batch: int, repeats: int) -> dict:
    policy = build_shapes_policy(kind, seed=0)
    policy.text_encoder.requires_grad_(False)
    sampler = SamplerConfig("ddim" if kind == "diffusion" else "sde", num_steps=10)
    trajectory = rollout(policy, ["a red circle left of a blue square"] * batch, sampler,
                         torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(policy.denoiser.parameters(), lr=1e-6)
    steps = torch.randint(0, sampler.num_steps, (batch,), generator=torch.Generator().manual_seed(1))
    advantages = torch.randn(batch, generator=torch.Generator().manual_seed(2))
    rows = torch.arange(batch)
    x = trajectory.states[rows, steps]
    t = trajectory.schedule.model_timesteps[steps]
    cond = trajectory.cond
    policy.denoiser.train()

    def bare() -> None:
        out = policy.predict(x, t, cond)
        out.mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.denoiser.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def update() -> None:
        new = transition_log_prob(policy, trajectory, steps)
        loss, _ = ppo_clip_loss(new.log_prob, trajectory.log_probs[rows, steps], advantages, 1e-4)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.denoiser.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timings = time_interleaved({"bare": bare, "update": update}, repeats=repeats)
    return {"kind": kind, "batch": batch, "bare_s": timings["bare"].median, "update_s": timings["update"].median,
            "ratio": timings["update"].median / timings["bare"].median}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    repeats = 5 if args.quick else 15
    rows = [measure("diffusion", 16, repeats), measure("flow", 16, repeats)]
    print(format_table(["model", "batch", "bare fwd+bwd (s)", "update (s)", "ratio"],
                       [[r["kind"], r["batch"], r["bare_s"], r["update_s"], r["ratio"]] for r in rows]))
    path = write_results("update_overhead", {"machine": machine_description(), "repeats": repeats, "rows": rows,
                                             "target_ratio": 1.15})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How far did training move a flow model? The mean squared change of its velocity against the base's.

Two runs that end at the same accuracy may have moved the model by very different amounts, and a run that
moved it little cannot have found much. This measures the movement in the model's own output: the base
draws one image for each of the first 64 held-out prompts (20-step ODE, seed 0); each image is noised to
the 8 levels $t = 1/8, \\dots, 1$ of a training sampler, $x_t = (1 - t)\\,x_0 + t\\,\\varepsilon$ (one fixed
$\\varepsilon$ per level); and for each level the benchmark reports
$\\overline{(v_\\theta(x_t, t, c) - v_\\text{base}(x_t, t, c))^2}$, averaged over pixels and images. The
same $x_t$ go to every model, so the numbers compare directly::

    python -m benchmarks.velocity_change RUN/final [RUN/final ...] [--base shapes-flow]

Writes ``benchmarks/results/velocity_change.json`` (one entry per run folder, merged).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_description, merge_results
from reference_impls.comparison import comparison_prompts
from reference_impls.models import load_policy
from reference_impls.models.policy import GenerativePolicy
from reference_impls.sampling import SamplerConfig
from reference_impls.sampling.rollout import rollout

PROMPTS = 64
LEVELS = tuple(k / 8 for k in range(1, 9))
RESULTS = RESULTS_DIR / "velocity_change.json"


def probe_states(base: GenerativePolicy, prompts: list[str]) -> list[tuple[float, torch.Tensor]]:
    """(t, x_t) for every level: the base's own images, noised with one fixed draw per level."""
    clean = rollout(base, prompts, SamplerConfig("ode", num_steps=20), torch.Generator().manual_seed(0)).states[:, -1]
    states = []
    for t in LEVELS:
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(round(t * 1000)))
        states.append((t, (1 - t) * clean + t * noise))
    return states


@torch.no_grad()
def velocity_change(model: GenerativePolicy, base: GenerativePolicy, prompts: list[str],
                    states: list[tuple[float, torch.Tensor]]) -> list[float]:
    """Mean squared velocity difference per level, in the order of ``states``."""
    cond = base.encode_text(prompts).detach()
    changes = []
    for t, x_t in states:
        timestep = torch.full((x_t.shape[0],), t * 1000)
        changes.append(float(((model.predict(x_t, timestep, cond) - base.predict(x_t, timestep, cond)) ** 2).mean()))
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="trained model folders (a run's final/)")
    parser.add_argument("--base", default="shapes-flow", help="the model the runs started from (default shapes-flow)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)} (give a run's final/ folder)")
    base = load_policy(args.base)
    if base.kind != "flow":
        parser.error(f"--base {args.base} is a {base.kind} model; this measures velocity, so it needs a flow model")
    base.denoiser.eval()
    prompts = comparison_prompts("heldout", PROMPTS)
    states = probe_states(base, prompts)
    measured = {}
    for run in args.runs:
        model = load_policy(run)
        model.denoiser.eval()
        per_level = velocity_change(model, base, prompts, states)
        measured[run] = {"base": args.base, "mean": sum(per_level) / len(per_level),
                         "per_level": dict(zip((f"{t:.3f}" for t in LEVELS), per_level))}
        print(f"{run}: mean squared velocity change {measured[run]['mean']:.2e}; by t = 1/8 .. 1: "
              + " ".join(f"{c:.1e}" for c in per_level))
    merge_results(RESULTS, "runs", measured, machine=machine_description(), prompts=PROMPTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

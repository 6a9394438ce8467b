"""How far fine-tuning moved a model's weights, and whether runs of one setting moved the same way.

A policy-gradient update with Adam moves every weight by about the learning rate per step whatever the
advantages are, so the distance a run travels says little about whether it followed a signal. The
direction does: if the reward's gradient shares a direction from batch to batch, independent seeds of one
setting move along it and their displacements $\\Delta_s = \\theta_s - \\theta_0$ point the same way (pairwise
cosine well above 0); a random walk gives cosines near 0. Run it on the seeds of a real reward and of the
``random-control`` reward side by side::

    python -m benchmarks.weight_displacement --base shapes-diffusion \\
        --runs runs/bench-methods/ddpo --runs "runs/bench-methods/ddpo_reward=random-control"

Each ``--runs`` folder holds ``seedN/final`` models (as ``benchmarks.method_table`` writes them). Prints, per
folder, the norm of each seed's displacement (absolute and relative to the base's weight norm) and the
pairwise cosines; writes ``benchmarks/results/weight_displacement.json``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, merge_results
from reference_impls.models import load_policy


def flat_weights(model: str | Path) -> dict[str, torch.Tensor]:
    """The denoiser's floating-point weights (merged LoRA included), by name."""
    state = load_policy(str(model)).denoiser.state_dict()
    return {k: v.detach().float().flatten() for k, v in state.items() if v.is_floating_point()}


def displacement(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> torch.Tensor:
    """theta_tuned - theta_base as one vector over the base's weights (in sorted name order)."""
    missing = sorted(set(base) - set(tuned))
    if missing:
        raise ValueError(f"the fine-tuned model lacks {len(missing)} of the base's weights, e.g. {missing[0]!r}")
    return torch.cat([tuned[k] - base[k] for k in sorted(base)])


def displacement_summary(base: dict[str, torch.Tensor], runs: list[dict[str, torch.Tensor]]) -> dict:
    """Norms of each run's displacement and the pairwise cosines between runs."""
    base_norm = float(torch.cat(list(base.values())).norm())
    moves = [displacement(base, run) for run in runs]
    cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(moves, 2)]
    norms = [float(m.norm()) for m in moves]
    return {"norms": norms, "relative_norms": [n / base_norm for n in norms], "pairwise_cosines": cosines,
            "mean_cosine": sum(cosines) / len(cosines) if cosines else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the model fine-tuning started from")
    parser.add_argument("--runs", action="append", required=True, help="a folder of seedN/final models (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = flat_weights(args.base)
    entries = {}
    for folder in map(Path, args.runs):
        seeds = sorted(p.parent for p in folder.glob("seed*/final") if p.is_dir())
        if not seeds:
            raise SystemExit(f"{folder}: no seedN/final models in it")
        summary = displacement_summary(base, [flat_weights(s / "final") for s in seeds])
        summary["seeds"] = [s.name for s in seeds]
        summary["base"] = args.base
        entries[folder.name] = summary
        print(f"{folder.name}: |dtheta| {', '.join(f'{n:.3f}' for n in summary['norms'])} "
              f"({', '.join(f'{r:.2%}' for r in summary['relative_norms'])} of the base's norm); "
              f"pairwise cosines {', '.join(f'{c:+.3f}' for c in summary['pairwise_cosines'])}")
    merge_results(RESULTS_DIR / "weight_displacement.json", "runs", entries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

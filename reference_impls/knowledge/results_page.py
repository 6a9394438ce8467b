"""The site's "Measured results" page, generated from ``benchmarks/results/*.json``.

Every number on it was written by a benchmark script of this repository; the page names the script, the
command and the machine, and says plainly when a benchmark has not been run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from reference_impls.knowledge.paths import repo_root

PAGE = "results.md"
CURVES = "assets/results/curves.png"
OVEROPTIMISATION = "assets/results/overoptimisation.png"


def _load(name: str) -> dict[str, Any] | None:
    path = repo_root() / "benchmarks" / "results" / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _machine(data: dict[str, Any]) -> str:
    machine = dict(data.get("machine", {}))
    load = machine.get("load_average_1_5_15min")
    if isinstance(load, list):
        machine["load_average_1_5_15min"] = " / ".join(f"{value:.1f}" for value in load)
    return (f"{machine.get('cpu_model', '?')}, {machine.get('logical_cores', '?')} logical cores, "
            f"torch {machine.get('torch', '?')}, {machine.get('torch_threads', '?')} torch threads, "
            f"load average at the time {machine.get('load_average_1_5_15min', '?')}")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _missing(script: str) -> str:
    return f'!!! warning "Not measured yet"\n    Run `python -m benchmarks.{script}` to produce these figures.\n\n'


METHOD_ORDER = ("ddpo", "ddpo-sf", "dpok", "refl", "draft-k", "draft-lv", "alignprop", "diffusion-dpo", "d3po",
                "diffusion-kto", "spo", "flow-grpo", "dance-grpo", "mix-grpo", "tempflow-grpo")


def _family_order(row: dict[str, Any]) -> int:
    """Families in the site's order (policy gradient, reward backprop, DPO, GRPO); unknown methods last."""
    return METHOD_ORDER.index(row["method"]) if row["method"] in METHOD_ORDER else len(METHOD_ORDER)


TASK_LABELS = {"single_object": "single object", "size": "size", "counting": "counting",
               "two_objects": "two objects", "colors": "colours", "color_attr": "colour attribution",
               "position": "position"}


def _measured_rows(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows measured with the paired protocol (seeds, CIs), in family order.

    A row written under a BibTeX key that was renamed since (bib/aliases.yaml) is shown under the new key.
    """
    from reference_impls.knowledge.bibliography import load_aliases

    aliases = load_aliases()
    rows = [dict(row, bib_key=aliases.get(row.get("bib_key", ""), row.get("bib_key")))
            for row in (data or {}).get("rows", {}).values() if "heldout" in row]
    return sorted(rows, key=_family_order)


def _gain(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "n/a"
    return f"{cell['diff']:+.3f} [{cell['ci_low']:+.3f}, {cell['ci_high']:+.3f}]"


def _verdict(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "n/a"
    if not cell["significant"]:
        return "no effect"
    return "**up**" if cell["ci_low"] > 0 else "**down**"


PROTOCOL = (
    "Each trained model is compared with its base on the same prompts, from the same initial noise, with the "
    "same deterministic 20-step sampler (`rlvg compare`): the whole held-out split (156 prompts, two draws each) "
    "for the exact evaluator, and 128 fixed training prompts for the reward the method trained on. A gain is the "
    "paired difference averaged over seeds and prompts; its 95% interval is a percentile bootstrap over seeds and "
    "prompts (stratified by task). \"up\" or \"down\" only when the interval excludes 0; otherwise \"no effect\"."
)


VIDEO_PROTOCOL = (
    "The same paired protocol on MotionWorld clips: the whole held-out split (243 prompts, one draw each: a clip "
    "costs about nine images) for the exact tracking evaluator, and 64 fixed training prompts for the trained "
    "reward; 95% percentile bootstrap over seeds and prompts, stratified by task."
)
MOTION_TASK_LABELS = {"single_motion": "one object moving", "speed": "with a speed", "two_motions": "two objects"}


def _is_video(row: dict[str, Any]) -> bool:
    return row.get("world") == "motion"


def _gain_table(rows: list[dict[str, Any]]) -> list[str]:
    """The main results table: one line per measured method (image and video sections alike)."""
    lines = ["| method | reward | base | held-out accuracy: base → trained | gain [95% CI] | verdict "
             "| matched score gain [95% CI] | trained reward gain [95% CI] | seeds | minutes / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracy = row["heldout"]["accuracy"]
        lines.append(
            f"| [{row['method']}](methods/{row['bib_key']}.md) | `{row['reward']}` | `{row['model']}` "
            f"| {_fmt(accuracy['base'])} → {_fmt(accuracy['model'])} | {_gain(accuracy)} | {_verdict(accuracy)} "
            f"| {_gain(row['heldout'].get('mean_score'))} | {_gain(row.get('train_reward'))} "
            f"| {len(row['seeds'])} | {_fmt(row['minutes_per_run'], 1)} |")
    return lines


def _video_methods_section() -> str:
    data = _load("methods")
    rows = [row for row in _measured_rows(data) if _is_video(row)]
    text = ["## Video: methods on MotionWorld, over seeds\n", VIDEO_PROTOCOL + " Measured by "
            "`python -m benchmarks.method_table METHOD --world motion --seeds 0 1 2`.\n"]
    if not rows:
        return "\n".join(text) + _missing("method_table --world motion")
    text.extend(_gain_table(rows))
    text.append("\nPer task (held-out accuracy, base → trained, and the paired gain):\n")
    text.append("| method | " + " | ".join(MOTION_TASK_LABELS.values()) + " | task mean |")
    text.append("|---|" + "---|" * (len(MOTION_TASK_LABELS) + 1))
    for row in rows:
        cells = []
        for key in [f"task_{t}" for t in MOTION_TASK_LABELS] + ["task_mean"]:
            cell = row["heldout"].get(key)
            cells.append("n/a" if not cell else f"{cell['base']:.2f} → {cell['model']:.2f}<br>{_gain(cell)}")
        text.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    for row in rows:
        if row.get("grid"):
            text.append(f"\n**{row['method']}**: base clips (top rows) and trained, seed 0 (bottom rows), frames left "
                        f"to right, same held-out prompts and noise.\n\n![{row['method']}: base and trained clips]"
                        f"(assets/results/{row['grid']})\n")
    return "\n".join(text) + "\n"


SOLID_PROTOCOL = (
    "The same paired protocol on SolidWorld's four views: the whole held-out split (515 prompts, one draw each) "
    "for the exact evaluator, and 64 fixed training prompts for the trained reward; 95% percentile bootstrap over "
    "seeds and prompts, stratified by task."
)


def _solid_section() -> str:
    """3D: multi-view RL rows of methods.json, and the per-prompt optimisers of fields.json."""
    text = ["## 3D: methods on SolidWorld\n", SOLID_PROTOCOL + " Measured by "
            "`python -m benchmarks.method_table METHOD --world solid --seeds 0 1 2`.\n"]
    rows = [row for row in _measured_rows(_load("methods")) if row.get("world") == "solid"]
    if rows:
        text.extend(_gain_table(rows))
        for row in rows:
            if row.get("grid"):
                text.append(f"\n**{row['method']}**: base views (top rows) and trained, seed 0 (bottom rows), the "
                            f"four cameras left to right, same held-out prompts and noise.\n\n![{row['method']}: base "
                            f"and trained views](assets/results/{row['grid']})\n")
    else:
        text.append(_missing("method_table --world solid"))
    fields = _load("fields")
    text.append("\n### Per-prompt 3D optimisers: before and after, paired with SDS\n")
    text.append("A per-prompt method fits one voxel field per prompt, so it is measured on a fixed set of held-out "
                "prompts (the same number per task) and seeds: plain score distillation (SDS) and the method start from the same "
                "field with the same noise at every step, and the exact evaluator scores the field's four renders "
                "after the last step. The gain is the method's paired difference from SDS, with a 95% bootstrap "
                "interval over seeds and prompts. Measured by the command under the table.\n")
    field_rows = (fields or {}).get("rows", {})
    if not field_rows:
        return "\n".join(text) + _missing("field_table") + "\n"
    text.append("| method | prompts x seeds | criterion | before | SDS | method | gain over SDS [95% CI] | verdict "
                "| minutes / field |")
    text.append("|---|---|---|---|---|---|---|---|---|")
    for name, row in field_rows.items():
        criteria = [("correct", "accuracy"), ("score", "matched score")]
        if row.get("reward") and row["reward"]["name"] != "solid-composition":  # a proxy: show it beside the truth
            criteria.append(("reward", f"its reward, `{row['reward']['name']}`"))
        for key, label in criteria:
            cell = row[key]
            interval = {"diff": cell["gain_over_sds"], "ci_low": cell["ci95"][0], "ci_high": cell["ci95"][1],
                        "significant": cell["ci95"][0] > 0 or cell["ci95"][1] < 0}
            text.append(f"| [{name}](methods/{_bib_key(name)}.md) | {row['prompts']} x {len(row['seeds'])} | {label} "
                        f"| {_fmt(cell.get('before', '–'))} | {_fmt(cell['sds'])} | {_fmt(cell['method'])} | {_gain(interval)} "
                        f"| {_verdict(interval)} | {_fmt(row['minutes_per_field'], 1)} |")
    commands = "; ".join(f"`{row.get('command', 'python -m benchmarks.field_table ' + name)}`"
                         for name, row in field_rows.items())
    text.append(f"\nCommands: {commands}. Machine: {_machine(fields)}.\n")
    return "\n".join(text) + "\n"


def _bib_key(method: str) -> str:
    from reference_impls.algorithms import METHODS

    return METHODS[method].bib_key if method in METHODS else method


def _methods_section() -> str:
    data = _load("methods")
    text = ["## Every method in its `cpu` preset, over seeds\n", PROTOCOL + " Measured by "
            "`python -m benchmarks.method_table METHOD --seeds 0 1 2`.\n"]
    rows = [row for row in _measured_rows(data) if row.get("world", "shapes") == "shapes"]
    if not rows:
        return "\n".join(text) + _missing("method_table")
    text.append(f"Machine: {_machine(data)}.\n")
    text.append(f"![Held-out accuracy against samples seen, mean and range over seeds]({CURVES})\n")
    text.append("The curves are each run's own evaluation during training: 128 held-out prompts, one draw each, "
                "noise fixed across the run. The table is the paired comparison of the final model on the whole "
                "split with two draws per prompt. Both estimate the same gain from different draws, so where the "
                "gain is a few points (an accuracy from one draw of 128 prompts has a standard error near 0.04) a "
                "curve can end below its start while the table says up; the table is the measurement.\n")
    text.extend(_gain_table(rows))
    gridded = [row for row in rows if row.get("grid")]
    if gridded:
        text.append("\n### Before and after, same prompts and noise\n")
        text.append("Top row: the base model; bottom row: the model trained with seed 0; eight held-out prompts, the "
                    "same initial noise and deterministic sampler for both.\n")
        for row in gridded:
            text.append(f"**{row['method']}**\n\n![{row['method']}: base (top) and trained (bottom) on the same "
                        f"held-out prompts and noise](assets/results/{row['grid']})\n")
    missing = [name for name in METHOD_ORDER if name not in {row["method"] for row in rows}]
    if missing:
        text.append(f"\nNot yet measured with this protocol: {', '.join(missing)}. Their pages say so; run "
                    "`python -m benchmarks.method_table " + " ".join(missing[:2]) + " ...` to add them.\n")
    text.append("\n### Per task (GenEval's categories on ShapeWorld)\n")
    text.append("Held-out accuracy per task, base → trained (mean over seeds), and the paired gain with its 95% "
                "interval. Tasks: single object; size (a size word); counting (two or three of one kind); two objects "
                "(same colour, different shapes); colours (same shape, different colours); colour attribution "
                "(different colours and shapes, each colour bound to its shape); position (a spatial relation). "
                "The held-out split has few prompts of some tasks (n below), so their intervals are wide.\n")
    tasks = [t for t in TASK_LABELS if any(f"task_{t}" in row["heldout"] for row in rows)]
    first = rows[0]["heldout"]
    text.append("| method | " + " | ".join(f"{TASK_LABELS[t]} (n={first.get(f'task_{t}', {}).get('n_prompts', '?')})"
                                            for t in tasks) + " | task mean |")
    text.append("|---|" + "---|" * (len(tasks) + 1))
    for row in rows:
        cells = []
        for key in [f"task_{t}" for t in tasks] + ["task_mean"]:
            cell = row["heldout"].get(key)
            cells.append("n/a" if not cell else f"{cell['base']:.2f} → {cell['model']:.2f}<br>{_gain(cell)}")
        text.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    text.append("\nThese are small runs on a laptop-class CPU: a method that shows no effect here may do well at "
                "the paper's scale, and the intervals say how much a difference of a few points can be trusted.\n")
    return "\n".join(text) + "\n"


def method_measurements(bib_key: str) -> str | None:
    """The measured rows of the methods implementing ``bib_key``, as a section for its method page."""
    data = _load("methods")
    rows = [row for row in _measured_rows(data) if row.get("bib_key") == bib_key]
    if not rows:
        return None
    text = ["## Measured in the atlas\n",
            f"Generated from `benchmarks/results/methods.json` (`python -m benchmarks.method_table`), machine: "
            f"{_machine(data)}. " + (VIDEO_PROTOCOL if all(_is_video(r) for r in rows) else PROTOCOL)
            + " All methods side by side: [Measured results](../results.md).\n",
            "| run | seeds | held-out accuracy: base → trained | gain [95% CI] | verdict "
            "| matched score gain | trained reward gain | minutes / run |",
            "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracy = row["heldout"]["accuracy"]
        text.append(f"| `{row['command']}` | {', '.join(map(str, row['seeds']))} | {_fmt(accuracy['base'])} → "
                    f"{_fmt(accuracy['model'])} | {_gain(accuracy)} | {_verdict(accuracy)} "
                    f"| {_gain(row['heldout'].get('mean_score'))} | {_gain(row.get('train_reward'))} "
                    f"| {_fmt(row['minutes_per_run'], 1)} |")
    text.append("")  # the table ends here: seeds and grids below it, one paragraph per row
    for row in rows:
        seeds = "; ".join(f"seed {s['seed']}: {_gain(s['accuracy'])}" for s in row.get("per_seed", []))
        label = f"`{row['method']}` on `{row['model']}`" if len(rows) > 1 else "Each seed on its own"
        if seeds:
            text.append(f"{label} (held-out accuracy gain per seed, 95% CI over prompts): {seeds}.\n")
        if row.get("grid"):
            text.append(f"![Base (top) and trained with seed 0 (bottom), same held-out prompts and noise]"
                        f"(../assets/results/{row['grid']})\n")
    return "\n".join(text) + "\n"


def _overhead_section(name: str, title: str, blurb: str, columns: list[tuple[str, str]]) -> str:
    data = _load(name)
    text = [f"## {title}\n", blurb + f" Measured by `python -m benchmarks.{name}`.\n"]
    if not data:
        return "\n".join(text) + _missing(name)
    text.append(f"Machine: {_machine(data)}.\n")
    rows = data.get("rows", [])
    text.append("| " + " | ".join(label for _, label in columns) + " |")
    text.append("|" + "---|" * len(columns))
    for row in rows:
        text.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    if "target_ratio" in data:
        text.append(f"\nTarget ratio: {data['target_ratio']} or less.")
    return "\n".join(text) + "\n\n"


def _rollout_section() -> str:
    data = _load("rollout_overhead")
    text = ["## Rollout with log-probabilities vs bare denoiser calls\n",
            "Our sampler records every state and the log-probability of every step; the ratio compares a rollout "
            "with the same number of denoiser calls and nothing else, and (for the tiny Stable Diffusion pipeline) "
            "with the stock `pipe(...)` call. Measured by `python -m benchmarks.rollout_overhead`.\n"]
    if not data:
        return "\n".join(text) + _missing("rollout_overhead")
    settings = data.get("settings", {})
    text.append(f"Machine: {_machine(data)}. Batch {settings.get('batch')}, {settings.get('steps')} steps, "
                f"{settings.get('timing', '')}.\n")
    text.append("| model | sampler | ours / bare calls | ours / bare (best runs) | ours / stock pipeline |")
    text.append("|---|---|---|---|---|")
    for case in data.get("cases", []):
        ratios = case.get("ratios", {})
        text.append(f"| {case['case']} | {case['sampler']} | {_fmt(ratios.get('ours/bare'))} "
                    f"| {_fmt(ratios.get('ours/bare (min)'))} | {_fmt(ratios.get('ours/stock'))} |")
    text.append(f"\nTarget ratio: {data.get('target_ratio')} or less.")
    return "\n".join(text) + "\n\n"


def _grpo_cost_section() -> str:
    data = _load("grpo_step_cost")
    text = ["## Cost of one GRPO iteration\n",
            "One outer iteration (collect, score, update) of each GRPO variant with the same model, reward, batch, "
            "group size and number of denoising steps; only the variant's own mechanism differs. Iterations are "
            "timed round-robin and summarised by the median; the last column is the ratio to Flow-GRPO. "
            "DiffusionNFT is timed beside them: its rollouts use the ODE, and its trained steps are the noise levels "
            "each clean image is fitted at. Measured by `python -m benchmarks.grpo_step_cost`.\n"]
    if not data:
        return "\n".join(text) + _missing("grpo_step_cost")
    settings = data.get("settings", {})
    text.append(f"Machine: {_machine(data)}. Batch {settings.get('batch_size')}, groups of "
                f"{settings.get('group_size')}, {settings.get('num_steps')} denoising steps, "
                f"{settings.get('rounds')} rounds.\n")
    text.append("| method | iteration (s) | of which rollout (s) | trained steps per image | ratio to Flow-GRPO |")
    text.append("|---|---|---|---|---|")
    for row in data.get("rows", []):
        label = row.get("variant", row["method"])
        text.append(f"| [{label}](methods/{row['bib_key']}.md) | {_fmt(row['median_step_s'])} "
                    f"| {_fmt(row['median_rollout_s'])} | {_fmt(row['trained_steps_per_image'], 1)} "
                    f"| {_fmt(row['ratio_to_flow_grpo'])} |")
    return "\n".join(text) + "\n\n"


def _dpok_section() -> str:
    data = _load("dpok_kl_share")
    text = ["## How much of DPOK's update is its KL term\n",
            "Norm of the KL term's gradient over the norm of the reward surrogate's, on one fresh batch after a few "
            "iterations of DPOK's `cpu` preset, for several $\\beta$ ($\\alpha$ fixed). Adam rescales the sum, so a "
            "share far below 1 means the KL does nothing. Measured by `python -m benchmarks.dpok_kl_share`.\n"]
    if not data:
        return "\n".join(text) + _missing("dpok_kl_share")
    text.append(f"Machine: {_machine(data)}.\n")
    text.append("| beta | alpha | iterations | KL (per pixel) | KL gradient norm | surrogate gradient norm | share |")
    text.append("|---|---|---|---|---|---|---|")
    for row in data.get("rows", []):
        text.append(f"| {row['beta']:g} | {row['alpha']:g} | {row['iterations']} | {row['kl']:.2e} "
                    f"| {row['kl_grad_norm']:.3g} | {row['surrogate_grad_norm']:.3g} | {row['share']:.3g} |")
    return "\n".join(text) + "\n\n"


def _variants_section() -> str:
    """Settings of a preset changed one at a time, measured with the same protocol as the table above."""
    data = _load("method_variants")
    text = ["## Variants of the presets\n",
            "One setting of a method's `cpu` preset changed, everything else as in the table above (same seeds, "
            "same paired protocol, compared with the same base). Measured by "
            "`python -m benchmarks.method_table METHOD --set KEY=VALUE --seeds 0 1 2`.\n"]
    rows = sorted((data or {}).get("rows", {}).items())
    if not rows:
        return "\n".join(text) + _missing("method_table --set")
    text.append(f"Machine: {_machine(data)}.\n")
    text.append("| variant | held-out accuracy: base → trained | gain [95% CI] | verdict | matched score gain [95% CI] "
                "| trained reward gain [95% CI] | seeds |")
    text.append("|---|---|---|---|---|---|---|")
    for label, row in rows:
        accuracy = row["heldout"]["accuracy"]
        changes = ", ".join(f"`{k}={v}`" for k, v in row.get("variant", {}).get("settings", {}).items())
        world = row.get("world", "shapes")
        name = row["method"] if world == "shapes" else f"{row['method']}@{world}"
        text.append(f"| {name} with {changes or label} | {_fmt(accuracy['base'])} → {_fmt(accuracy['model'])} "
                    f"| {_gain(accuracy)} | {_verdict(accuracy)} | {_gain(row['heldout'].get('mean_score'))} "
                    f"| {_gain(row.get('train_reward'))} | {len(row['seeds'])} |")
    return "\n".join(text) + "\n\n"


def _reward_margin_section() -> str:
    """What one small policy-gradient step on each reward does to accuracy and to objects drawn."""
    data = _load("reward_margin")
    text = ["## Rewards at the margin: what a small step on each one buys\n",
            "Groups of images per training prompt from the base, drawn with Flow-GRPO's `cpu` rollout sampler; each "
            "candidate reward is turned into the preset's group advantages $A$, and the slope of a metric $m$ is the "
            "mean of $A\\,m$, the first-order change of $m$ under a step that tilts each prompt's images towards "
            "positive advantage. *Relative* is the accuracy slope over the binary accuracy reward's. A reward aligned "
            "with accuracy at the margin has a relative slope near 1 and no object slope beyond the accuracy "
            "reward's own. Same images for every row (paired); 95% bootstrap intervals over prompts. Measured by "
            "`python -m benchmarks.reward_margin`; see [Rewards](rewards.md#aligned-at-the-margin-measured).\n"]
    if not data:
        return "\n".join(text) + _missing("reward_margin")
    text.append(f"Machine: {_machine(data)}. `{data['model']}`, {data['prompts']} training prompts x "
                f"{data['group_size']} images ({data['sampler']}): accuracy {_fmt(data['base_accuracy'])}, "
                f"{_fmt(data['objects_per_image'], 2)} objects per image for {_fmt(data['objects_asked'], 2)} asked.\n")
    text.append("| reward | groups with signal | accuracy slope [95% CI] | relative to the accuracy reward "
                "| objects-per-image slope [95% CI] |")
    text.append("|---|---|---|---|---|")

    def interval(d: dict[str, float]) -> str:
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    for row in data.get("rows", []):
        text.append(f"| {row['reward']} | {_fmt(row['groups_with_signal'], 2)} | {interval(row['accuracy_slope'])} "
                    f"| {interval(row['relative_to_accuracy_reward'])} | {interval(row['objects_slope'])} |")
    return "\n".join(text) + "\n\n"


def _overoptimisation_section() -> str:
    data = _load("overoptimisation")
    text = ["## Over-optimising a learned reward\n",
            "DRaFT-K (`cpu` preset) follows the gradient of the learned proxy `shapes-learned`; the exact evaluator "
            "is never used in training and plays the part of human judgement. At each evaluation the figure "
            "places the proxy reward and the exact scores (held-out prompts, same initial noise) against the KL "
            "divergence from the trained model's DDPM sampling chain to the base model's, "
            "$\\mathrm{KL} = \\mathbb{E}_{x\\sim p_\\theta}\\sum_t \\lVert\\mu_\\theta(x_t)-\\mu_{\\text{base}}(x_t)"
            "\\rVert^2/2\\sigma_t^2$ (exact for chains that share each step's variance; summed over pixels). "
            "Over-optimisation is the proxy still rising while the exact score falls. "
            "Measured by `python -m benchmarks.overoptimisation`.\n"]
    if not data:
        return "\n".join(text) + _missing("overoptimisation")
    text.append(f"Machine: {_machine(data)}. Seed {data.get('seed', 0)}, one run per learning rate.\n")
    text.append(f"![Proxy reward and exact scores against KL to the base]({OVEROPTIMISATION})\n")
    text.append("| learning rate | iteration | samples seen | KL to base | proxy reward | exact accuracy | exact matched score |")
    text.append("|---|---|---|---|---|---|---|")
    for run in data.get("runs", []):
        for point in run["curve"]:
            text.append(f"| {run['learning_rate']:g} | {point['step']} | {point['samples_seen']} | {point['kl']:.3g} "
                        f"| {point['proxy_reward']:.3f} | {point['accuracy']:.3f} | {point['mean_score']:.3f} |")
    return "\n".join(text) + "\n\n"


def overoptimisation_figure_png(data: dict[str, Any]) -> bytes:
    """Proxy reward (left) and exact matched score (right) against KL to the base, one line per learning rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.4, 3.0), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    proxy_ax, exact_ax = figure.subplots(1, 2)
    base = data["runs"][0]["curve"][0]  # every run starts from the same model: KL 0, the base's scores
    for ax, key in ((proxy_ax, "proxy_reward"), (exact_ax, "mean_score")):
        ax.axhline(base[key], color="grey", ls="--", lw=1, label="base model (KL 0)")
    for run in data["runs"]:
        points = [p for p in run["curve"] if p["kl"] > 0]  # a log axis has no 0: the base is the dashed line
        kl = [p["kl"] for p in points]
        label = f"lr {run['learning_rate']:g}"
        proxy_ax.plot(kl, [p["proxy_reward"] for p in points], marker="o", ms=3, label=label)
        exact_ax.plot(kl, [p["mean_score"] for p in points], marker="o", ms=3, label=label)
    for ax, title in ((proxy_ax, "proxy reward (trained on)"), (exact_ax, "exact matched score (never seen)")):
        ax.set_xscale("log")
        ax.set_xlabel("KL(trained chain || base chain), nats; points every 10 iterations", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    proxy_ax.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _trl_section() -> str:
    data = _load("trl_ddpo_speed")
    text = ["## DDPO epoch against trl's DDPOTrainer\n",
            "trl 0.23.1's `DDPOTrainer` (the last trl with DDPO) and `rlvg train ddpo` train the same saved tiny "
            "Stable Diffusion pipeline with identical settings (batch 16, minibatch 8, 20 DDIM steps with eta 1, "
            "CFG 5, lr 3e-4, batch-normalised advantages, JPEG reward, fp32, one thread each), in alternating "
            "blocks. Median epoch times. Measured by `python -m benchmarks.trl_ddpo_speed --trl-path DIR`.\n"]
    if not data:
        return "\n".join(text) + _missing("trl_ddpo_speed --trl-path DIR")
    medians = data.get("medians_s", {})
    text.append(f"Machine: {_machine(data)}.\n")
    text.append("| contender | epoch (s) | ratio to trl |")
    text.append("|---|---|---|")
    text.append(f"| trl 0.23.1 DDPOTrainer | {_fmt(medians.get('trl'), 2)} | 1.00 |")
    labels = {"ours_steps_per_call_1": "`rlvg train ddpo --steps-per-call 1` (one step per UNet call, as trl)",
              "ours_steps_per_call_all": "`rlvg train ddpo --steps-per-call 0` (a minibatch's 20 steps per call)",
              "ours_steps_per_call_all_channels_last": "the same with `--channels-last true` (weights in channels-last "
                                                       "memory order)"}
    for key, label in labels.items():
        if key not in medians:  # measured before that contender existed
            continue
        text.append(f"| {label} | {_fmt(medians.get(key), 2)} | {_fmt(data.get('ratio_to_trl', {}).get(key), 2)} |")
    text.append(f"\nTarget: {data.get('target_ratio')}x trl's epoch or less.")
    return "\n".join(text) + "\n\n"


def _gpu_section() -> str:
    data = _load("gpu")
    text = ["## GPU check\n",
            "Every method's `gpu` preset for a few iterations on CUDA, and the update step of a random "
            "SD-1.x-size UNet at bf16 with its share of the GPU's bf16 peak. Measured by `make gpu-check`.\n"]
    if not data:
        return "\n".join(text) + ('!!! warning "Not measured yet"\n    No GPU has been available to this project. '
                                    "`make gpu-check` on a CUDA machine writes these figures.\n\n")
    update = data.get("unet_update", {})
    text.append(f"Device: {update.get('device')}. UNet update: {update.get('parameters_m', 0):.0f}M parameters, batch "
                f"{update.get('batch')}, {_fmt(update.get('seconds'))} s per step, "
                f"{_fmt(update.get('achieved_tflops'), 1)} TFLOP/s, utilisation {_fmt(update.get('utilisation'), 2)} "
                "(target 0.40).\n")
    text.append("| method | model | s per iteration | peak memory (GiB) |")
    text.append("|---|---|---|---|")
    for name, row in data.get("methods", {}).items():
        text.append(f"| {name} | {row['model']} | {_fmt(row['seconds_per_iteration'], 2)} "
                    f"| {_fmt(row.get('peak_memory_gib'), 2)} |")
    return "\n".join(text) + "\n\n"


def results_page() -> str:
    parts = [
        "<!-- Generated by reference_impls/knowledge/results_page.py from benchmarks/results/*.json. -->\n",
        "# Measured results\n",
        "Numbers measured by this repository's benchmark scripts, on the machine named under each table. "
        "Timings are ratios measured in one run (interleaved, medians), so they transfer across machines better "
        "than seconds do.\n",
        _methods_section(),
        _video_methods_section(),
        _solid_section(),
        _variants_section(),
        _reward_margin_section(),
        _grpo_cost_section(),
        _dpok_section(),
        _overoptimisation_section(),
        _rollout_section(),
        _overhead_section("update_overhead", "Update step vs bare forward+backward",
                          "One PPO-style minibatch update (recompute log-probs of stored transitions, clipped "
                          "loss, backward, optimiser step) against a bare forward+backward+step of the same model on "
                          "the same batch and timesteps.",
                          [("kind", "model"), ("batch", "batch"), ("bare_s", "bare (s)"), ("update_s", "update (s)"),
                           ("ratio", "ratio")]),
        _trl_section(),
        _gpu_section(),
    ]
    return "\n".join(parts)


def curves_figure_png(data: dict[str, Any]) -> bytes:
    """Held-out accuracy against samples seen per method: mean over seeds and the range of the seeds."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for row in _measured_rows(data) if any(s.get("curve") for s in row.get("per_seed", []))]
    columns = min(4, max(1, len(rows)))
    grid_rows = (len(rows) + columns - 1) // columns
    figure = Figure(figsize=(3.2 * columns, 2.5 * grid_rows + 0.6), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(grid_rows, columns, squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        curves = [s["curve"] for s in row["per_seed"] if s.get("curve")]
        length = min(len(c) for c in curves)
        samples = np.array([point["samples_seen"] for point in curves[0][:length]])
        values = np.array([[point["accuracy"] for point in c[:length]] for c in curves])
        ax.fill_between(samples, values.min(axis=0), values.max(axis=0), alpha=0.25, color="#1565c0", lw=0)
        ax.plot(samples, values.mean(axis=0), marker="o", ms=3, color="#1565c0")
        ax.set_title(f"{row['method']}{' (video)' if _is_video(row) else ''} ({len(curves)} seeds)", fontsize=9)
        ax.set_xlabel("samples seen", fontsize=8)
        ax.set_ylabel("held-out accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    figure.suptitle("Held-out accuracy during training (in-run evaluation, 128 prompts): mean and range over seeds",
                    fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _write_if_changed(target: Path, content: bytes) -> None:
    if target.is_file() and target.read_bytes() == content:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)


def write(docs_dir: Path) -> list[dict[str, str]]:
    data = _load("methods")
    figure = docs_dir / CURVES
    rows = _measured_rows(data)
    if rows:
        _write_if_changed(figure, curves_figure_png(data))
    elif figure.exists():
        figure.unlink()
    for row in rows:
        source = repo_root() / "benchmarks" / "results" / row.get("grid", "-")
        if row.get("grid") and source.is_file():
            _write_if_changed(docs_dir / "assets" / "results" / row["grid"], source.read_bytes())
    overoptimisation = _load("overoptimisation")
    if overoptimisation:
        _write_if_changed(docs_dir / OVEROPTIMISATION, overoptimisation_figure_png(overoptimisation))
    elif (docs_dir / OVEROPTIMISATION).exists():
        (docs_dir / OVEROPTIMISATION).unlink()
    _write_if_changed(docs_dir / PAGE, results_page().encode("utf-8"))
    return [{"Measured results": PAGE}]

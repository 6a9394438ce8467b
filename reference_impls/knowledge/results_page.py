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
FIGURE = "assets/results/methods.png"


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


def _methods_section() -> str:
    data = _load("methods")
    text = ["## Every method in its `cpu` preset\n",
            "Held-out compositional accuracy (all criteria of the prompt hold, exact ShapeWorld evaluator, "
            "deterministic sampler, fixed held-out prompts) before and after training with each method's `cpu` "
            "preset. Measured by `python -m benchmarks.method_table`.\n"]
    if not data or not data.get("rows"):
        return "\n".join(text) + _missing("method_table")
    text.append(f"Machine: {_machine(data)}.\n")
    text.append(f"![Held-out accuracy and mean score before and after each method's cpu run]({FIGURE})\n")
    text.append("| method | reward | model | accuracy before → after | mean score before → after "
                "| training reward first → last | samples / pairs | train wall time (s) | s / step |")
    text.append("|---|---|---|---|---|---|---|---|---|")
    for row in sorted(data["rows"].values(), key=_family_order):
        text.append(
            f"| [{row['method']}](methods/{row['bib_key']}.md) | `{row['reward']}` | `{row['model']}` "
            f"| {_fmt(row['heldout_accuracy_before'])} → {_fmt(row['heldout_accuracy_after'])} "
            f"| {_fmt(row.get('heldout_score_before'))} → {_fmt(row.get('heldout_score_after'))} "
            f"| {_fmt(row.get('reward_first'))} → {_fmt(row.get('reward_last'))} "
            f"| {_fmt(row.get('samples_seen'))} | {_fmt(row.get('train_wall_s'), 0)} | {_fmt(row.get('s_per_step'), 2)} |")
    text.append("\nThe training reward is the method's own (a learned proxy, `shapes-learned`, for the reward-backprop "
                "methods, which need a differentiable one); the held-out columns are the exact evaluator, which no "
                "method trains on directly. A training reward that rises while the exact score falls is reward "
                "hacking. One standard error on 256 prompts is about 0.017 for accuracy and 0.015 for the mean "
                "score; wall times were measured with two to four training processes sharing the 2 cores "
                "(about 1.5-2x an idle machine).\n")
    text.append("\nThese are small runs on a laptop-class CPU: differences of a few points on 256 prompts are within "
                "noise, and a method that does not move the needle here may do well at the paper's scale.\n")
    return "\n".join(text) + "\n"


def method_measurements(bib_key: str) -> str | None:
    """The method-table rows of the methods implementing ``bib_key``, as a section for its method page."""
    data = _load("methods")
    rows = [row for row in (data or {}).get("rows", {}).values() if row.get("bib_key") == bib_key]
    if not rows:
        return None
    text = ["## Measured in the atlas\n",
            f"Generated from `benchmarks/results/methods.json` (`python -m benchmarks.method_table`), "
            f"machine: {_machine(data)}. Held-out ShapeWorld prompts (256), exact evaluator, deterministic "
            "20-step sampler; one standard error is about 0.02 on either number. All methods side by side: "
            "[Measured results](../results.md).\n",
            "| run | accuracy before → after | mean score before → after | training reward first → last "
            "| samples / pairs | wall time (s) |",
            "|---|---|---|---|---|---|"]
    for row in rows:
        text.append(f"| `{row['command']}` | {_fmt(row['heldout_accuracy_before'])} → "
                    f"{_fmt(row['heldout_accuracy_after'])} | {_fmt(row.get('heldout_score_before'))} → "
                    f"{_fmt(row.get('heldout_score_after'))} | {_fmt(row.get('reward_first'))} → "
                    f"{_fmt(row.get('reward_last'))} | {_fmt(row.get('samples_seen'))} "
                    f"| {_fmt(row.get('train_wall_s'), 0)} |")
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
            "Measured by `python -m benchmarks.grpo_step_cost`.\n"]
    if not data:
        return "\n".join(text) + _missing("grpo_step_cost")
    settings = data.get("settings", {})
    text.append(f"Machine: {_machine(data)}. Batch {settings.get('batch_size')}, groups of "
                f"{settings.get('group_size')}, {settings.get('num_steps')} denoising steps, "
                f"{settings.get('rounds')} rounds.\n")
    text.append("| method | iteration (s) | of which rollout (s) | trained steps per image | ratio to Flow-GRPO |")
    text.append("|---|---|---|---|---|")
    for row in data.get("rows", []):
        text.append(f"| [{row['method']}](methods/{row['bib_key']}.md) | {_fmt(row['median_step_s'])} "
                    f"| {_fmt(row['median_rollout_s'])} | {_fmt(row['trained_steps_per_image'], 1)} "
                    f"| {_fmt(row['ratio_to_flow_grpo'])} |")
    return "\n".join(text) + "\n\n"


def results_page() -> str:
    parts = [
        "<!-- Generated by reference_impls/knowledge/results_page.py from benchmarks/results/*.json. -->\n",
        "# Measured results\n",
        "Numbers measured by this repository's benchmark scripts, on the machine named under each table. "
        "Timings are ratios measured in one run (interleaved, medians), so they transfer across machines better "
        "than seconds do.\n",
        _methods_section(),
        _grpo_cost_section(),
        _rollout_section(),
        _overhead_section("update_overhead", "Update step vs bare forward+backward",
                          "One PPO-style minibatch update (recompute log-probs of stored transitions, clipped "
                          "loss, backward, optimiser step) against a bare forward+backward+step of the same model on "
                          "the same batch and timesteps.",
                          [("kind", "model"), ("batch", "batch"), ("bare_s", "bare (s)"), ("update_s", "update (s)"),
                           ("ratio", "ratio")]),
    ]
    return "\n".join(parts)


def methods_figure_png(data: dict[str, Any]) -> bytes:
    """Before -> after arrows per method: held-out accuracy and mean score, grouped in family order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(data["rows"].values(), key=_family_order)
    figure = Figure(figsize=(10, 0.38 * len(rows) + 1.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    positions = list(range(len(rows)))[::-1]
    for ax, key, title in ((axes[0], "accuracy", "held-out accuracy"), (axes[1], "score", "held-out mean score")):
        for y, row in zip(positions, rows):
            before, after = row[f"heldout_{key}_before"], row[f"heldout_{key}_after"]
            colour = "#2e7d32" if after > before else "#c62828" if after < before else "#757575"
            ax.annotate("", xy=(after, y), xytext=(before, y),
                        arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.8))
            ax.plot([before], [y], "o", color="#9e9e9e", ms=4)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        values = [row[f"heldout_{key}_{when}"] for row in rows for when in ("before", "after")]
        margin = 0.05 * (max(values) - min(values) or 1.0)
        ax.set_xlim(min(values) - margin, max(values) + margin)
    axes[0].set_yticks(positions, [f"{row['method']} ({row['reward']})" for row in rows])
    figure.suptitle("Each method's cpu preset: grey dot = base model, arrow head = after training (exact evaluator)")
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
    figure = docs_dir / FIGURE
    if data and data.get("rows"):
        _write_if_changed(figure, methods_figure_png(data))
    elif figure.exists():
        figure.unlink()
    _write_if_changed(docs_dir / PAGE, results_page().encode("utf-8"))
    return [{"Measured results": PAGE}]

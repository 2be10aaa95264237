"""The outputs of a run: ``result.json`` (everything), ``summary.md`` (tables), the plots, and console tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..core.files import atomic_write_bytes
from ..core.plots import plot_accuracy_matrix, plot_task_accuracy
from ..core.tables import accuracy_matrix_markdown
from .results import MethodResult, RunResult

RESULT_NAME = "result.json"
SUMMARY_NAME = "summary.md"
HEATMAP_NAME = "accuracy_matrix.png"
CURVES_NAME = "task_accuracy.png"
METRIC_NAMES = {
    "average_accuracy": "final average accuracy",
    "average_incremental_accuracy": "average incremental accuracy",
    "backward_transfer": "BWT",
    "forgetting": "forgetting",
}


def _cell(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def matrix_table(result: MethodResult, task_names: Sequence[str]) -> str:
    """Markdown table of ``R[t][k]`` in percent (rows: after training task t; columns: evaluated task k)."""
    return accuracy_matrix_markdown(result.accuracy_matrix, task_names)


def metric_rows(results: Sequence[MethodResult]) -> list[tuple[str, dict[str, float], float]]:
    """``(label, metrics, seconds)`` per method and, after it, per further head (``RunConfig.heads``)."""
    rows = []
    for result in results:
        rows.append((result.head_label(), result.metrics, result.seconds))
        for head, views in result.head_metrics().items():
            rows.append((result.head_label(head), views["class"], result.seconds))
    return rows


def metrics_table(results: Sequence[MethodResult]) -> str:
    """One row per method (and per further head): the four metrics (percentage points) and the time."""
    lines = [
        "| method | " + " | ".join(METRIC_NAMES.values()) + " | time (s) |",
        "|---" * (len(METRIC_NAMES) + 2) + "|",
    ]
    for label, metrics, seconds in metric_rows(results):
        cells = [f"{100 * metrics[key]:+.1f}" if key == "backward_transfer" else
                 f"{100 * metrics[key]:.1f}" for key in METRIC_NAMES]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def summary_markdown(run: RunResult) -> str:
    names = [task["name"] for task in run.stream]
    config = run.config
    parts = [
        f"# {config.name}",
        "",
        f"{config.scenario}-incremental, {len(names)} tasks, model `{config.model}`, dataset `{config.dataset}`, "
        f"paradigm `{config.paradigm}`, head masking `{config.masking}`, {config.epochs:g} epochs per task, seed "
        f"{config.seed}. Accuracy in %; `R[t][k]` is the accuracy on task k's test set after training task t.",
        "",
        "## Metrics",
        "",
        metrics_table(list(run.results.values())),
        "",
        "BWT is negative and forgetting positive when old tasks lost accuracy (`peft_gp.core.metrics`).",
    ]
    for result in run.results.values():
        parts += ["", f"## Accuracy matrix: {result.head_label()}", "", matrix_table(result, names)]
    parts += ["", "## Tasks", "", "| task | classes | train | test |", "|---|---|---|---|"]
    parts += [
        f"| {t['task_id'] + 1} {t['name']} | {', '.join(t['class_names'])} | {t['train_examples']} | "
        f"{t['test_examples']} |"
        for t in run.stream
    ]
    if run.paths:
        parts += ["", "Files: " + ", ".join(f"`{Path(p).name}`" for p in run.paths.values())]
    return "\n".join(parts) + "\n"


def comparison_text(run: RunResult) -> str:
    """Console text: each method's matrix, then the metrics side by side."""
    names = [task["name"] for task in run.stream]
    width = min(16, max(6, *(len(f"T{k + 1} {n}") for k, n in enumerate(names))))
    columns = []
    for result in run.results.values():
        lines = [f"{result.head_label()}: accuracy (%) after task t", "after " + " ".join(
            f"T{k + 1} {n}"[:width].rjust(width) for k, n in enumerate(names))]  # fmt: skip
        lines += [f"T{t + 1:<5}" + " ".join(_cell(v).rjust(width) for v in row)
                  for t, row in enumerate(result.accuracy_matrix)]  # fmt: skip
        columns.append(lines)
    side = max(len(line) for line in columns[0])
    if len(columns) > 1 and (side + 3) * len(columns) <= 160:  # the methods' matrices side by side
        blocks = ["\n".join(" | ".join(line.ljust(side) for line in row).rstrip() for row in zip(*columns))]
    else:  # too wide for a terminal: one under the other
        blocks = ["\n".join(lines) for lines in columns]
    rows = metric_rows(list(run.results.values()))
    label_width = max(len(label) for label, _, _ in rows)
    lines = [f"{'method':<{label_width}} | final avg acc | avg inc acc |    BWT | forgetting | time"]
    for label, m, seconds in rows:
        lines.append(
            f"{label:<{label_width}} | {100 * m['average_accuracy']:12.1f}% | "
            f"{100 * m['average_incremental_accuracy']:10.1f}% | {100 * m['backward_transfer']:+6.1f} | "
            f"{100 * m['forgetting']:10.1f} | {seconds:.0f}s"
        )
    return "\n\n".join(blocks + ["\n".join(lines)])


def write_outputs(run: RunResult, folder: Path) -> dict[str, str]:
    """Write the plots (if enabled), ``summary.md`` and ``result.json`` into ``folder``; fills ``run.paths``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [task["name"] for task in run.stream]
    if run.config.plots:
        matrices = {r.head_label(): r.accuracy_matrix for r in run.results.values()}
        title = run.config.name
        plot_accuracy_matrix(matrices, folder / HEATMAP_NAME, names, title)
        plot_task_accuracy(matrices, folder / CURVES_NAME, names, title)
        run.paths["heatmap"] = str(folder / HEATMAP_NAME)
        run.paths["task_accuracy"] = str(folder / CURVES_NAME)
    run.paths["summary"] = str(folder / SUMMARY_NAME)
    run.paths["result"] = str(folder / RESULT_NAME)
    atomic_write_bytes(run.paths["summary"], summary_markdown(run).encode())
    atomic_write_bytes(run.paths["result"], (json.dumps(run.to_dict(), indent=2) + "\n").encode())
    return run.paths

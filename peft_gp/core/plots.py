"""Plots of a run: a heatmap of the accuracy matrix and each task's accuracy over time.

Figures are built with matplotlib's object API (no pyplot, no global backend change), so they work headless and a
notebook shows the returned ``Figure`` inline. Each function saves a PNG when given a path and returns the figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

Matrix = Sequence[Sequence[float | None]]


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("Plots need matplotlib: pip install matplotlib (or set plots: false).") from error
    return Figure(layout="constrained", **kwargs)


def _value(row: Sequence[float | None], k: int) -> float:
    value = row[k] if k < len(row) else None
    return math.nan if value is None else float(value)


def plot_accuracy_matrix(
    matrices: Mapping[str, Matrix],
    path: str | Path | None = None,
    task_names: Sequence[str] | None = None,
    title: str = "",
):
    """Heatmap of ``R[t][k]`` (percent) for each method side by side; cells of unseen tasks are blank."""
    import numpy as np

    count = len(matrices)
    tasks = max(len(m) for m in matrices.values())
    size = 1.2 + 0.7 * tasks
    figure = _figure(figsize=(size * count + 1, size))
    axes = figure.subplots(1, count, squeeze=False)
    labels = list(task_names) if task_names else [f"T{k + 1}" for k in range(tasks)]
    labels = [label if len(label) <= 18 else label[:17] + "…" for label in labels]
    image = None
    for axis, (name, matrix) in zip(axes[0], matrices.items()):
        data = np.array([[_value(row, k) for k in range(tasks)] for row in matrix], dtype=float) * 100
        image = axis.imshow(np.ma.masked_invalid(data), vmin=0, vmax=100, cmap="viridis")
        for t in range(data.shape[0]):
            for k in range(tasks):
                if not math.isnan(data[t, k]):
                    color = "black" if data[t, k] > 60 else "white"
                    axis.text(k, t, f"{data[t, k]:.0f}", ha="center", va="center", color=color, fontsize=8)
        axis.set_title(name)
        axis.set_xticks(range(tasks), labels, rotation=45, ha="right", fontsize=7)
        axis.set_yticks(range(data.shape[0]), [f"after {k + 1}" for k in range(data.shape[0])], fontsize=7)
        axis.set_xlabel("evaluated task")
    figure.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)", shrink=0.8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_task_accuracy(
    matrices: Mapping[str, Matrix],
    path: str | Path | None = None,
    task_names: Sequence[str] | None = None,
    title: str = "",
):
    """Accuracy of each task (one line per task, from the step it was learned) over the training steps."""
    count = len(matrices)
    figure = _figure(figsize=(4.5 * count, 3.5))
    axes = figure.subplots(1, count, squeeze=False, sharey=True)
    for axis, (name, matrix) in zip(axes[0], matrices.items()):
        tasks = len(matrix)
        for k in range(tasks):
            steps = list(range(k + 1, tasks + 1))
            values = [100 * _value(matrix[t], k) for t in range(k, tasks)]
            label = task_names[k] if task_names else f"T{k + 1}"
            axis.plot(steps, values, marker="o", label=label if len(label) <= 24 else label[:23] + "…")
        average = [100 * sum(_value(matrix[t], k) for k in range(t + 1)) / (t + 1) for t in range(tasks)]
        axis.plot(range(1, tasks + 1), average, color="black", linestyle="--", linewidth=2, label="average")
        axis.set_title(name)
        axis.set_xlabel("after training task")
        axis.set_xticks(range(1, tasks + 1))
        axis.set_ylim(-5, 105)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _save(figure, path: str | Path | None):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    return figure

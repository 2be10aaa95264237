"""The accuracy matrix and its metrics as Markdown tables (run summaries and model cards share them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Matrix = Sequence[Sequence[float | None]]


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def accuracy_matrix_markdown(matrix: Matrix, task_names: Sequence[str]) -> str:
    """``R[t][k]`` in percent: rows after training task t, columns evaluated task k, and each row's mean."""
    size = max(len(matrix), max((len(row) for row in matrix), default=0), len(task_names))
    names = [task_names[k] if k < len(task_names) else f"task {k + 1}" for k in range(size)]
    header = "| after task | " + " | ".join(f"T{k + 1} {name}" for k, name in enumerate(names)) + " | avg |"
    lines = [header, "|---" * (size + 2) + "|"]
    for t, row in enumerate(matrix):
        cells = [_percent(row[k] if k < len(row) else None) for k in range(size)]
        seen = [value for value in row if value is not None]
        average = f"{100 * sum(seen) / len(seen):.1f}" if seen else ""
        lines.append(f"| {t + 1} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def metrics_markdown(metrics: Mapping[str, float]) -> str:
    """One row per metric (fractions, shown as they are with four decimals)."""
    rows = [f"| {key} | {value:.4f} |" for key, value in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])

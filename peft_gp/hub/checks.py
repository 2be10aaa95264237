"""Checks made before a task is saved for the Hub or pushed: the repo id and the accuracy matrix."""

from __future__ import annotations

import math
from numbers import Real


def check_repo_id(repo_id) -> str:
    """Return ``repo_id`` if the Hub accepts it as a model repo id (``name`` or ``namespace/name``), else raise.

    Uses ``huggingface_hub``'s own validator, so a bad id fails here, before anything is written or sent, rather
    than after the local save (and never reaches the model card). Raises ``ValueError``.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a Hub repo id like 'me/my-run', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repo id: {error} Use 'namespace/name' (letters, digits, '-', '_', '.'; "
            "at most 96 characters; no '--' or '..'). Nothing was saved or sent."
        ) from None
    return repo_id


def check_accuracy_matrix(matrix) -> None:
    """Refuse an accuracy matrix that is not a list of rows of accuracies: finite numbers in [0, 1], or ``None``.

    Accuracies are fractions (0.93, not 93); a value out of range or not finite would give a card with nonsense
    metrics. The error names the first bad value (``accuracy_matrix[t][k]``). ``None`` (no matrix) passes.
    """
    if matrix is None:
        return
    fix = "Each value must be a finite number in [0, 1] (a fraction, not a percentage) or None. Nothing was written."
    if isinstance(matrix, (str, bytes)) or not hasattr(matrix, "__iter__"):
        raise ValueError(f"accuracy_matrix must be a list of rows (R[t][k]), got {type(matrix).__name__}. {fix}")
    for t, row in enumerate(matrix):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise ValueError(f"accuracy_matrix[{t}] = {row!r} is not a row (a list of accuracies). {fix}")
        for k, value in enumerate(row):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"accuracy_matrix[{t}][{k}] = {value!r} is not a number. {fix}")
            if not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"accuracy_matrix[{t}][{k}] = {value!r} is not an accuracy. {fix}")


def check_metrics(metrics: dict) -> None:
    """Refuse metrics of the card that are not finite numbers in [-1, 1] (accuracy, forgetting, BWT)."""
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
            raise ValueError(f"The metric {name} = {value!r} of the accuracy matrix is not a finite number.")
        if not -1.0 <= float(value) <= 1.0:
            raise ValueError(f"The metric {name} = {value!r} of the accuracy matrix is outside [-1, 1].")

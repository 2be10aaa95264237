"""Checks of the ``gp_*`` settings, shared by the ``GP*Config`` classes and the run config (one source of truth)."""

from __future__ import annotations

import difflib
import re

PROJECTION_MODES = ("gradient", "update")
GRAM_DTYPES = ("float64", "float32")
MODULES_TO_SAVE_POLICIES = ("project", "freeze", "train")


def _number(name: str, value, kind: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{name} must be {kind}, got {value!r}.")


def check_gp_settings(settings: dict) -> None:
    """Check the ``gp_*`` settings given (a config's, or a run config's, which share these checks and defaults)."""
    check_update_settings(settings)
    if "gp_threshold" in settings:
        threshold = settings["gp_threshold"]
        _number("gp_threshold", threshold, "a number in (0, 1]")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(
                f"gp_threshold must be in (0, 1], got {threshold}. It is the share of each task's feature energy to "
                "protect: 0.97 is the usual value, 1.0 protects the whole span of the features."
            )
    if "gp_threshold_increment" in settings:
        increment = settings["gp_threshold_increment"]
        _number("gp_threshold_increment", increment, "a number in [0, 1)")
        if not 0.0 <= increment < 1.0:
            raise ValueError(f"gp_threshold_increment must be in [0, 1), got {increment} (GPM uses 0.003).")
    if settings.get("gp_threshold_pattern") is not None:
        check_threshold_pattern(settings["gp_threshold_pattern"])
    if "gp_projection" in settings and settings["gp_projection"] not in PROJECTION_MODES:
        raise ValueError(f"gp_projection must be one of {PROJECTION_MODES}, got {settings['gp_projection']!r}.")
    if "gp_memory_samples" in settings:
        samples = settings["gp_memory_samples"]
        if isinstance(samples, bool) or not isinstance(samples, int):
            raise TypeError(f"gp_memory_samples must be a positive integer, got {samples!r}.")
        if samples < 1:
            raise ValueError(f"gp_memory_samples must be at least 1, got {samples}.")
    if settings.get("gp_importance_scale") is not None:
        scale = settings["gp_importance_scale"]
        _number("gp_importance_scale", scale, "a positive number or None")
        if not 0.0 < scale < float("inf"):
            raise ValueError(f"gp_importance_scale must be positive and finite (SGP uses 10) or None, got {scale}.")
    if settings.get("gp_task_slices") is not None:
        slices = settings["gp_task_slices"]
        if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
            raise ValueError(f"gp_task_slices must be a positive integer (the most tasks) or None, got {slices!r}.")
    if "gp_class_statistics" in settings and not isinstance(settings["gp_class_statistics"], bool):
        raise TypeError(f"gp_class_statistics must be True or False, got {settings['gp_class_statistics']!r}.")
    if "gp_modules_to_save" in settings and settings["gp_modules_to_save"] not in MODULES_TO_SAVE_POLICIES:
        raise ValueError(
            f"gp_modules_to_save must be one of {MODULES_TO_SAVE_POLICIES}, got {settings['gp_modules_to_save']!r}."
        )


def _positive_int(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{what}, got {value!r}.")


def check_update_settings(settings: dict) -> None:
    """Check the memory update's bounds: ``gp_update_budget_gb`` and ``gp_max_basis_rank``."""
    budget = settings.get("gp_update_budget_gb")
    if budget is not None:
        _number("gp_update_budget_gb", budget, "a positive number of GB or None")
        if not 0.0 < budget < float("inf"):
            raise ValueError(f"gp_update_budget_gb must be positive and finite (GB) or None (one pass), got {budget}.")
    cap = settings.get("gp_max_basis_rank")
    if isinstance(cap, dict):
        for pattern, value in _checked_patterns("gp_max_basis_rank", cap):
            _positive_int(f"gp_max_basis_rank[{pattern!r}]", value, "")
    elif cap is not None:
        _positive_int("gp_max_basis_rank", cap, ", a dict of name pattern -> positive integer, or None")
    check_sketch_settings(settings)


def check_sketch_settings(settings: dict) -> None:
    """Check ``gp_sketch_above``, ``gp_sketch_rows`` (and that the sketch goes without SGP importances) and
    ``gp_gram_dtype``."""
    above = settings.get("gp_sketch_above")
    if above is not None:
        _positive_int("gp_sketch_above", above, " (inputs wider than this are sketched) or None")
    if "gp_sketch_rows" in settings:
        rows = settings["gp_sketch_rows"]
        _positive_int("gp_sketch_rows", rows, " (the rows ℓ of each sketch)")
        if rows < 2:
            raise ValueError(f"gp_sketch_rows must be at least 2 (a sketch keeps ℓ − 1 rows), got {rows}.")
    if "gp_gram_dtype" in settings and settings["gp_gram_dtype"] not in GRAM_DTYPES:
        raise ValueError(
            f"gp_gram_dtype must be one of {GRAM_DTYPES} (the dtype of each batch's Gram product; the sums stay "
            f"float64), got {settings['gp_gram_dtype']!r}."
        )
    if above is not None and settings.get("gp_importance_scale") is not None:
        raise ValueError(
            "gp_sketch_above cannot go with gp_importance_scale: SGP's importances need each direction's energy in "
            "the task's Gram matrix, which a sketched input does not keep. Drop one of the two."
        )


def check_threshold_pattern(pattern) -> None:
    """``gp_threshold_pattern``: a dict from a regular expression (searched in a projected group's name) to a
    threshold in (0, 1]."""
    if not isinstance(pattern, dict):
        raise TypeError(f"gp_threshold_pattern must be a dict of name pattern -> threshold, not {pattern!r}.")
    for key, value in _checked_patterns("gp_threshold_pattern", pattern):
        _number(f"gp_threshold_pattern[{key!r}]", value, "a number in (0, 1]")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"gp_threshold_pattern[{key!r}] must be a threshold in (0, 1], got {value}.")


def _checked_patterns(name: str, setting: dict):
    """The ``(pattern, value)`` items of a ``{regex: value}`` setting, each key checked to be a regular expression."""
    for pattern, value in setting.items():
        if not isinstance(pattern, str):
            raise TypeError(f"{name}'s keys must be regular expressions (str), got {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{name}: {pattern!r} is not a regular expression ({error}).") from None
        yield pattern, value


def pattern_values(names: list[str], setting: dict, name: str, pick) -> dict[str, object]:
    """Per group name, ``pick`` of the values whose pattern is found in it (``re.search``), ``None`` where none is.
    A pattern that matches no group is refused: a misspelt name would silently leave those layers as they were."""
    values = {}
    for group in names:
        found = [value for pattern, value in setting.items() if re.search(pattern, group)]
        values[group] = pick(found) if found else None
    unused = [pattern for pattern in setting if not any(re.search(pattern, group) for group in names)]
    if unused:
        raise ValueError(
            f"{name}'s pattern(s) {unused} match no projected group (e.g. {names[:3]}): a misspelt name would leave "
            "those layers as they were. Fix the pattern, searched in the group's name."
        )
    return values


def rank_caps(names: list[str], setting: int | dict[str, int] | None) -> dict[str, int | None]:
    """Each projected group's ``gp_max_basis_rank``: the int for all, or the smallest value of the patterns found in
    its name (``re.search``; ``None`` where none is)."""
    if setting is None:
        return dict.fromkeys(names)
    if not isinstance(setting, dict):
        return dict.fromkeys(names, setting)
    return pattern_values(names, setting, "gp_max_basis_rank", min)


def group_thresholds(names: list[str], config, tasks_seen: int) -> dict[str, float]:
    """Each projected group's energy threshold for storing task ``tasks_seen`` (0-based): ``gp_threshold``, or the
    highest value of the ``gp_threshold_pattern`` patterns found in its name, plus ``gp_threshold_increment`` per task
    already stored, at most 1."""
    pattern = getattr(config, "gp_threshold_pattern", None) or {}
    chosen = pattern_values(names, pattern, "gp_threshold_pattern", max)
    step = config.gp_threshold_increment * tasks_seen
    return {name: min(1.0, (config.gp_threshold if value is None else value) + step) for name, value in chosen.items()}


def kept_whole(names: list[str], config) -> set[str]:
    """The groups ``gp_threshold_pattern`` pins at a threshold of 1 (asked to keep their whole input space)."""
    pattern = getattr(config, "gp_threshold_pattern", None) or {}
    chosen = pattern_values(names, pattern, "gp_threshold_pattern", max)
    return {name for name, value in chosen.items() if value is not None and value >= 1.0}


def check_gp_kwargs(extra, known: set[str], taken: dict[str, str]) -> dict:
    """``extra`` (a run's ``gp_kwargs``) if each key is in ``known`` (the GP configs' arguments) and not in ``taken``
    (key -> where it is set instead); else a ``ValueError`` naming the key, with the closest valid one."""
    if not isinstance(extra, dict):
        raise ValueError(f"gp_kwargs must be a mapping of gp_* arguments to values, got {extra!r}.")
    allowed = sorted(known - set(taken))
    for key in extra:
        if key in taken:
            raise ValueError(f"gp_kwargs sets {key!r}: {taken[key]}.")
        if key not in known:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else f" It takes: {', '.join(allowed)}."
            raise ValueError(f"Unknown key {key!r} in gp_kwargs.{hint}")
    return extra

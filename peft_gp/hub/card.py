"""The model card (``README.md``) of a task pushed to the Hub: metadata, settings, memory, tasks, accuracy matrix."""

from __future__ import annotations

import json
import os
import re

from torch import nn

from ..core.metrics import accuracy_matrix_summary
from ..core.peft_utils import unwrap_peft_model
from ..core.tables import accuracy_matrix_markdown, metrics_markdown
from ..wiring.config import gp_config_of
from ..wiring.state import get_state
from ..wiring.task_record import GP_TASKS_NAME, GPTaskState
from .checks import check_accuracy_matrix, check_metrics, check_repo_id
from .manifest import PLOT_NAME, task_branch

CARD_TAGS = ["peft", "peft-gp", "continual-learning"]
# Markdown and HTML characters of user text (task and class names, settings) as HTML entities: they cannot end a
# table cell or row, open a code span, a link or a tag. Control characters and line breaks become spaces.
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "`": "&#96;", "\\": "&#92;", "*": "&#42;",
             "_": "&#95;", "[": "&#91;", "]": "&#93;", "~": "&#126;", '"': "&quot;"}  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_CODE_SAFE = re.compile(r"[^`|\x00-\x1f\x7f\x85\u2028\u2029]*")


def markdown_text(value) -> str:
    """``value`` as one line of Markdown text that shows exactly as written: safe in a table cell, never HTML."""
    text = _CONTROL.sub(" ", str(value))
    return "".join(_ENTITIES.get(char, char) for char in text)


def markdown_code(value) -> str:
    """``value`` in code style: a backtick code span when that is safe, else ``<code>`` with the text escaped."""
    text = str(value)
    if text and _CODE_SAFE.fullmatch(text):
        return f"`{text}`"
    return f"<code>{markdown_text(text)}</code>"


def _base_model_id(peft_model) -> str | None:
    config = gp_config_of(peft_model)
    name = config.base_model_name_or_path or getattr(peft_model.get_base_model().config, "_name_or_path", None)
    # The Hub's metadata only accepts repo ids here; a local path would make the card's YAML invalid.
    if not isinstance(name, str) or os.path.exists(name):
        return None
    try:
        return check_repo_id(name)
    except ValueError:
        return None


def _use_section(repo_id: str | None, branch: str, task_id: int) -> list[str]:
    # Python string literals of a validated repo id (letters, digits, '-', '_', '.', '/') and a generated branch name
    where, branch = json.dumps(repo_id or "<repo_id>"), json.dumps(branch)
    return [
        "## Use",
        "",
        "```python",
        "import peft_gp",
        "from peft import PeftModel",
        "",
        f"# continue the sequence with task {task_id + 2}: the memory protects tasks 1 to {task_id + 1}",
        f"model = peft_gp.from_pretrained(base_model, {where}, revision={branch}, is_trainable=True)",
        "# inference only, with plain PEFT",
        f"model = PeftModel.from_pretrained(base_model, {where}, revision={branch})",
        "```",
        "",
    ]


def _settings_section(config, memory) -> list[str]:
    return [
        "## Gradient-projection settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {markdown_code(name)} | {markdown_code(value)} |" for name, value in sorted(config.gp_fields().items())),
        f"| target modules | {markdown_code(_names(config.target_modules))} |",
        f"| `modules_to_save` | {markdown_code(_names(config.modules_to_save))} |",
        "",
        "## Memory",
        "",
        "| tasks stored | projected matrices | mean capacity used | max capacity used | full (frozen) |",
        "|---|---|---|---|---|",
        _memory_row(memory),
        "",
    ]


def _tasks_section(state: GPTaskState) -> list[str]:
    rows = [
        f"| {k + 1} | `{task_branch(k)}` | {markdown_text(name)} | {markdown_text(_classes_text(classes))} |"
        for k, (name, classes) in enumerate(zip(state.task_names, state.task_classes))
    ]
    seen = markdown_text(_classes_text(state.classes_seen)) if state.classes_seen else "not recorded"
    return ["## Tasks", "", "| # | branch | name | classes |", "|---|---|---|---|", *rows, "",
            f"Classes seen so far: {seen}.", ""]  # fmt: skip


def model_card(
    model: nn.Module,
    task_id: int,
    *,
    repo_id: str | None = None,
    adapter_name: str | None = None,
    plot: bool = False,
) -> str:
    """The ``README.md`` of a task checkpoint: YAML metadata (library, base model, tags) and a Markdown body.

    Task names, class labels and settings are escaped (``markdown_text``, ``markdown_code``): whatever they hold,
    they cannot break a table or the code sample, nor put HTML into the card. ``repo_id`` must be a valid repo id and
    the accuracy matrix must hold accuracies in [0, 1] (``ValueError`` otherwise).
    """
    from huggingface_hub import ModelCardData

    if repo_id is not None:
        check_repo_id(repo_id)
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    config = gp_config_of(peft_model, adapter_name)
    gp_state = get_state(peft_model, adapter_name)
    memory, state = gp_state.memory, gp_state.tasks
    check_accuracy_matrix(state.accuracy_matrix)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    base_model = _base_model_id(peft_model)
    base_tags = getattr(peft_model.get_base_model(), "model_tags", None) or []
    data = ModelCardData(library_name="peft", base_model=base_model, tags=sorted({*CARD_TAGS, peft_type.lower(),
                                                                                   *map(str, base_tags)}))  # fmt: skip
    lines = ["---", data.to_yaml(), "---", ""]
    lines += _intro(peft_type, base_model, repo_id, state.task_names[task_id], task_id, memory.tasks_seen)
    lines += _use_section(repo_id, task_branch(task_id), task_id)
    lines += _settings_section(config, memory) + _tasks_section(state) + _matrix_section(state, plot)
    return "\n".join(lines) + "\n"


def _intro(peft_type: str, base_model, repo_id, task_name: str, task_id: int, tasks_seen: int) -> list[str]:
    base_text = markdown_code(base_model) if base_model else "its base model"
    title = markdown_text(repo_id.split("/")[-1]) if repo_id else "peft_gp adapter"
    return [
        f"# {title}",
        "",
        f"A {markdown_text(peft_type)} adapter for {base_text}, trained on a sequence of tasks with gradient "
        "projection ([PEGP](https://arxiv.org/abs/2405.13383), GPM-style memory bases) by `peft_gp`: training a new "
        "task leaves the adapter's outputs on the earlier tasks' features unchanged.",
        "",
        f"This revision holds the model after task {task_id + 1} ({markdown_text(task_name)}): the adapter weights "
        f"(with any head in `modules_to_save`), `gp_memory.safetensors` (bases of tasks 1 to {tasks_seen}) "
        f"and `{GP_TASKS_NAME}` (task names, classes seen, accuracy matrix). Each task has its own branch "
        "(`task-01`, `task-02`, ...).",
        "",
    ]


def _memory_row(memory) -> str:
    capacity = list(memory.capacity().values())
    mean = sum(capacity) / len(capacity) if capacity else 0.0
    return (
        f"| {memory.tasks_seen} | {len(capacity)} | {mean:.1%} | {max(capacity, default=0.0):.1%} | "
        f"{len(memory.full_groups())} |"
    )


def _names(names) -> str:
    if not names:
        return "None"
    return str(names) if isinstance(names, str) else str(sorted(names))


def _classes_text(classes) -> str:
    if classes is None:
        return "-"
    return ", ".join(str(label) for label in classes)


def _matrix_section(state: GPTaskState, plot: bool) -> list[str]:
    lines = ["## Accuracy matrix", ""]
    matrix = state.accuracy_matrix
    if not matrix:
        return lines + ["Not evaluated in this run.", ""]
    lines += [
        "`R[t][k]`: accuracy (%) on task k after training task t (rows are time).",
        "",
        accuracy_matrix_markdown(matrix, [markdown_text(name) for name in state.task_names]),
        "",
    ]
    try:
        metrics = accuracy_matrix_summary(matrix)
    except ValueError:  # a task not evaluated after each task: no metrics
        metrics = None
    if metrics is not None:
        check_metrics(metrics)
        lines += [metrics_markdown(metrics), ""]
    if plot:
        lines += [f"![accuracy matrix]({PLOT_NAME})", ""]
    return lines

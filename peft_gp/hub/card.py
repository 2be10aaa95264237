"""The model card (``README.md``) of a task pushed to the Hub: metadata, settings, memory, tasks, accuracy matrix."""

from __future__ import annotations

import os
import re

from torch import nn

from ..core.metrics import accuracy_matrix_summary
from ..core.peft_utils import unwrap_peft_model
from ..core.tables import accuracy_matrix_markdown, metrics_markdown
from ..wiring.config import gp_config_of
from ..wiring.state import get_state
from ..wiring.task_record import GP_TASKS_NAME, GPTaskState, default_task_name

MODEL_CARD_NAME = "README.md"
PLOT_NAME = "gp_accuracy_matrix.png"
CARD_TAGS = ["peft", "peft-gp", "continual-learning"]
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def task_branch(task_id: int) -> str:
    """The Hub branch of task ``task_id`` (0-based): ``task-01`` for the first task."""
    return default_task_name(task_id)


def _base_model_id(peft_model) -> str | None:
    config = gp_config_of(peft_model)
    name = config.base_model_name_or_path or getattr(peft_model.get_base_model().config, "_name_or_path", None)
    # The Hub's metadata only accepts repo ids here; a local path would make the card's YAML invalid.
    if name and _REPO_ID.match(name) and not os.path.exists(name):
        return name
    return None


def _use_section(where: str, branch: str, task_id: int) -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "import peft_gp",
        "from peft import PeftModel",
        "",
        f"# continue the sequence with task {task_id + 2}: the memory protects tasks 1 to {task_id + 1}",
        f'model = peft_gp.from_pretrained(base_model, "{where}", revision="{branch}", is_trainable=True)',
        "# inference only, with plain PEFT",
        f'model = PeftModel.from_pretrained(base_model, "{where}", revision="{branch}")',
        "```",
        "",
    ]


def _settings_section(config, memory) -> list[str]:
    return [
        "## Gradient-projection settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| `{name}` | `{value}` |" for name, value in sorted(config.gp_fields().items())),
        f"| target modules | `{sorted(config.target_modules) if config.target_modules else None}` |",
        f"| `modules_to_save` | `{sorted(config.modules_to_save) if config.modules_to_save else None}` |",
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
        f"| {k + 1} | `{task_branch(k)}` | {name} | {_classes_text(classes)} |"
        for k, (name, classes) in enumerate(zip(state.task_names, state.task_classes))
    ]
    seen = _classes_text(state.classes_seen) if state.classes_seen else "not recorded"
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
    """The ``README.md`` of a task checkpoint: YAML metadata (library, base model, tags) and a Markdown body."""
    from huggingface_hub import ModelCardData

    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    config = gp_config_of(peft_model, adapter_name)
    gp_state = get_state(peft_model, adapter_name)
    memory, state = gp_state.memory, gp_state.tasks
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    base_model = _base_model_id(peft_model)
    base_tags = getattr(peft_model.get_base_model(), "model_tags", None) or []
    data = ModelCardData(library_name="peft", base_model=base_model, tags=sorted({*CARD_TAGS, peft_type.lower(),
                                                                                   *base_tags}))  # fmt: skip
    base_text = f"`{base_model}`" if base_model else "its base model"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1] if repo_id else 'peft_gp adapter'}",
        "",
        f"A {peft_type} adapter for {base_text}, trained on a sequence of tasks with gradient projection "
        "([PEGP](https://arxiv.org/abs/2405.13383), GPM-style memory bases) by `peft_gp`: training a new task "
        "leaves the adapter's outputs on the earlier tasks' features unchanged.",
        "",
        f"This revision holds the model after task {task_id + 1} (`{state.task_names[task_id]}`): the adapter weights "
        f"(with any head in `modules_to_save`), `gp_memory.safetensors` (bases of tasks 1 to {memory.tasks_seen}) "
        f"and `{GP_TASKS_NAME}` (task names, classes seen, accuracy matrix). Each task has its own branch "
        "(`task-01`, `task-02`, ...).",
        "",
    ]
    lines += _use_section(repo_id or "<repo_id>", task_branch(task_id), task_id)
    lines += _settings_section(config, memory) + _tasks_section(state) + _matrix_section(state, plot)
    return "\n".join(lines) + "\n"


def _memory_row(memory) -> str:
    capacity = list(memory.capacity().values())
    mean = sum(capacity) / len(capacity) if capacity else 0.0
    return (
        f"| {memory.tasks_seen} | {len(capacity)} | {mean:.1%} | {max(capacity, default=0.0):.1%} | "
        f"{len(memory.full_groups())} |"
    )


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
        accuracy_matrix_markdown(matrix, state.task_names),
        "",
    ]
    try:
        lines += [metrics_markdown(accuracy_matrix_summary(matrix)), ""]
    except ValueError:
        pass
    if plot:
        lines += [f"![accuracy matrix]({PLOT_NAME})", ""]
    return lines

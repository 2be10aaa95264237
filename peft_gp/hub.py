"""Share each task's checkpoint on the Hugging Face Hub: one commit and one branch per task, with a model card.

``push_task_to_hub(model, repo_id, local_dir=...)`` first saves the task locally (adapter weights, head,
``gp_memory.safetensors``, ``gp_tasks.json`` and ``README.md``), then uploads that folder in one commit to ``main``
and points the branch ``task-03`` (1-based, two digits: ``task_branch(task_id)``) at it. Anyone can then pick the
sequence up at that task with ``peft_gp.from_pretrained(base, repo_id, revision="task-03", is_trainable=True)``.
If the upload fails, nothing trained is lost: ``GPHubError`` says what failed, where the local copy is and how to
retry with ``push_task_folder(local_dir, repo_id)``.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from .paradigms.base import gp_config_of, unwrap_peft_model
from .state import get_memory
from .task_state import GP_TASKS_NAME, GPTaskState, default_task_name, get_task_state, normalize_matrix

MODEL_CARD_NAME = "README.md"
PLOT_NAME = "gp_accuracy_matrix.png"
CARD_TAGS = ["peft", "peft-gp", "continual-learning"]
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class GPHubError(RuntimeError):
    """A Hub request failed. The message says what failed and how to retry; the local copy is in ``local_dir``."""

    def __init__(self, message: str, local_dir: str | None = None):
        super().__init__(message)
        self.local_dir = local_dir


def task_branch(task_id: int) -> str:
    """The Hub branch of task ``task_id`` (0-based): ``task-01`` for the first task."""
    return default_task_name(task_id)


@dataclass
class TaskPush:
    """What ``push_task_to_hub`` made: load it back with ``from_pretrained(base, repo_id, revision, subfolder)``."""

    repo_id: str
    task_id: int
    revision: str  # the task branch, or ``refs/pr/N`` with ``create_pr=True``
    subfolder: str | None
    commit: Any  # huggingface_hub.CommitInfo (oid, commit_url, pr_url)
    local_dir: str


# ---- errors ------------------------------------------------------------------------------------------------------


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def explain_hub_error(error: BaseException, action: str, token: str | None = None) -> str | None:
    """A one-paragraph explanation of a Hub failure, or ``None`` when ``error`` is not a Hub/network error."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    first_line = _redact(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__, token)
    if isinstance(error, OfflineModeIsEnabled):
        return f"{action} failed: HF_HUB_OFFLINE is set, so no request may reach the Hub. Unset it to use the Hub."
    if isinstance(error, RevisionNotFoundError):
        return (
            f"{action} failed: the revision does not exist ({first_line}). Task branches are named task-01, task-02, "
            "...; list them with huggingface_hub.HfApi().list_repo_refs(repo_id)."
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{action} failed: the repository does not exist or this token may not access it ({first_line}). Check "
            "the repo id, and for a private repo log in (HF_TOKEN or `hf auth login`)."
        )
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        if status == 401:
            return (
                f"{action} failed: the Hub rejected the credentials (401). Set HF_TOKEN to a valid token with write "
                "access, or run `hf auth login`."
            )
        if status == 403:
            return f"{action} failed: this token may not write to the repository (403). Use a token with write access."
        return f"{action} failed: the Hub answered {status}: {first_line}"
    if isinstance(error, (*_transport_errors(), ConnectionError, TimeoutError)):
        return (
            f"{action} failed: the Hub could not be reached or the connection broke off mid-request "
            f"({type(error).__name__}: {first_line}). Check the network (and HF_ENDPOINT), then retry."
        )
    if isinstance(error, LocalEntryNotFoundError):
        return (
            f"{action} failed: the Hub could not be reached and there is no cached copy ({first_line}). Check the "
            "network (and HF_ENDPOINT), then retry."
        )
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    # The HTTP client under huggingface_hub (httpx2 in 2.x, httpx or requests before): network down, cut off, timeout.
    found = []
    candidates = [("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")]
    candidates.append(("requests", "Timeout"))
    for module_name, class_name in candidates:
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@contextmanager
def hub_errors(action: str, retry: str = "", local_dir: str | None = None, token: str | None = None) -> Iterator[None]:
    """Turn Hub and network errors inside the block into a ``GPHubError`` that explains them (token redacted)."""
    try:
        yield
    except GPHubError:
        raise
    except Exception as error:
        explanation = explain_hub_error(error, action, token)
        if explanation is None:
            raise
        raise GPHubError(" ".join(part for part in (explanation, retry) if part), local_dir=local_dir) from error


# ---- local save --------------------------------------------------------------------------------------------------


def record_task(
    model: nn.Module,
    task_id: int | None = None,
    task_name: str | None = None,
    classes: list | None = None,
    accuracy_matrix: list[list[float | None]] | None = None,
    adapter_name: str | None = None,
) -> int:
    """Record a finished task in the model's ``gp_tasks.json`` state; returns its ``task_id``.

    ``task_id`` defaults to the last task stored in the memory. It must match the memory: pushing a task whose bases
    are not stored yet would let the next task overwrite it.
    """
    memory = get_memory(model, adapter_name)
    state = get_task_state(model, adapter_name)
    if memory.tasks_seen == 0:
        raise ValueError(
            "The memory is empty: train the task and store it first (GPTrainer does it when train() ends; otherwise "
            "call peft_gp.update_memory). A checkpoint without its task's bases would not protect it."
        )
    if task_id is None:
        task_id = memory.tasks_seen - 1
    if memory.tasks_seen != task_id + 1:
        raise ValueError(
            f"The memory holds {memory.tasks_seen} task(s), but task_id={task_id} is task {task_id + 1}: store the "
            "finished task in the memory first (GPTrainer does it when train() ends; otherwise call "
            "peft_gp.update_memory), or pass the task_id of the last stored task."
        )
    for missing in range(state.tasks_seen, task_id):  # tasks stored by update_memory without a record
        state.record(missing)
    state.record(task_id, task_name, classes)
    if accuracy_matrix is not None:
        state.accuracy_matrix = normalize_matrix(accuracy_matrix)
    return task_id


def save_task(
    model: nn.Module,
    local_dir: str,
    task_id: int | None = None,
    task_name: str | None = None,
    *,
    classes: list | None = None,
    accuracy_matrix: list[list[float | None]] | None = None,
    plot_path: str | None = None,
    extra_files: list[str] | None = None,
    repo_id: str | None = None,
    adapter_name: str | None = None,
) -> int:
    """Write everything the Hub gets for one task into ``local_dir``; returns the ``task_id``.

    ``local_dir`` receives PEFT's adapter files (weights with the head of ``modules_to_save``, config),
    ``gp_memory.safetensors``, ``gp_tasks.json``, the model card ``README.md``, the accuracy-matrix plot (the given
    ``plot_path``, else drawn with matplotlib when installed) and copies of ``extra_files``.
    """
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    task_id = record_task(model, task_id, task_name, classes, accuracy_matrix, adapter_name)
    state = get_task_state(model, adapter_name)
    os.makedirs(local_dir, exist_ok=True)
    peft_model.save_pretrained(local_dir, selected_adapters=[adapter_name])
    adapter_dir = local_dir if adapter_name == "default" else os.path.join(local_dir, adapter_name)
    plot_written = False
    if plot_path is not None:
        shutil.copyfile(plot_path, os.path.join(local_dir, PLOT_NAME))
        plot_written = True
    elif state.accuracy_matrix:
        plot_written = _draw_accuracy_matrix(state, os.path.join(local_dir, PLOT_NAME))
    for path in extra_files or []:
        shutil.copyfile(path, os.path.join(local_dir, os.path.basename(path)))
    card = model_card(peft_model, task_id, repo_id=repo_id, adapter_name=adapter_name, plot=plot_written)
    with open(os.path.join(local_dir, MODEL_CARD_NAME), "w") as handle:
        handle.write(card)
    state.save(os.path.join(adapter_dir, GP_TASKS_NAME))  # the save hook wrote it too; be sure it is current
    if adapter_dir != local_dir:  # push_task_folder reads the task record at the top of the folder
        state.save(os.path.join(local_dir, GP_TASKS_NAME))
    return task_id


def _draw_accuracy_matrix(state: GPTaskState, path: str) -> bool:
    """Draw ``R[t][k]`` as a heatmap PNG (matplotlib's object API: no pyplot, no global backend change)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = state.accuracy_matrix
    size = max(len(rows), max(len(row) for row in rows))
    grid = [[math.nan] * size for _ in range(len(rows))]
    for t, row in enumerate(rows):
        for k, value in enumerate(row):
            grid[t][k] = math.nan if value is None else value
    figure = Figure(figsize=(1.2 + 0.6 * size, 1.0 + 0.5 * len(rows)))
    axes = figure.subplots()
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
    labels = [state.task_names[i] if i < state.tasks_seen else f"task {i + 1}" for i in range(size)]
    axes.set_xticks(range(size), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), labels[: len(rows)])
    axes.set_xlabel("evaluated on")
    axes.set_ylabel("after training")
    for t, row in enumerate(grid):
        for k, value in enumerate(row):
            if not math.isnan(value):
                axes.text(k, t, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return True


# ---- model card --------------------------------------------------------------------------------------------------


def _base_model_id(peft_model) -> str | None:
    config = gp_config_of(peft_model)
    name = config.base_model_name_or_path or getattr(peft_model.get_base_model().config, "_name_or_path", None)
    # The Hub's metadata only accepts repo ids here; a local path would make the card's YAML invalid.
    if name and _REPO_ID.match(name) and not os.path.exists(name):
        return name
    return None


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

    from .continual.metrics import accuracy_matrix_summary

    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    config = gp_config_of(peft_model, adapter_name)
    memory = get_memory(peft_model, adapter_name)
    state = get_task_state(peft_model, adapter_name)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    base_model = _base_model_id(peft_model)
    base_tags = getattr(peft_model.get_base_model(), "model_tags", None) or []
    tags = sorted({*CARD_TAGS, peft_type.lower(), *base_tags})
    data = ModelCardData(library_name="peft", base_model=base_model, tags=tags)
    where = repo_id or "<repo_id>"
    branch = task_branch(task_id)
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
        "## Use",
        "",
        "```python",
        "import peft_gp",
        "from peft import PeftModel",
        "",
        f'# continue the sequence with task {task_id + 2}: the memory protects tasks 1 to {task_id + 1}',
        f'model = peft_gp.from_pretrained(base_model, "{where}", revision="{branch}", is_trainable=True)',
        "# inference only, with plain PEFT",
        f'model = PeftModel.from_pretrained(base_model, "{where}", revision="{branch}")',
        "```",
        "",
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
        "## Tasks",
        "",
        "| # | branch | name | classes |",
        "|---|---|---|---|",
        *(
            f"| {k + 1} | `{task_branch(k)}` | {name} | {_classes_text(classes)} |"
            for k, (name, classes) in enumerate(zip(state.task_names, state.task_classes))
        ),
        "",
        f"Classes seen so far: {_classes_text(state.classes_seen) if state.classes_seen else 'not recorded'}.",
        "",
    ]
    lines += _matrix_section(state, plot, accuracy_matrix_summary)
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


def _matrix_section(state: GPTaskState, plot: bool, summary) -> list[str]:
    lines = ["## Accuracy matrix", ""]
    matrix = state.accuracy_matrix
    if not matrix:
        return lines + ["Not evaluated in this run.", ""]
    size = max(len(matrix), max(len(row) for row in matrix))
    names = [state.task_names[k] if k < state.tasks_seen else f"task {k + 1}" for k in range(size)]
    lines += [
        "`R[t][k]`: accuracy on task k after training task t (rows are time).",
        "",
        "| after \\ on | " + " | ".join(names) + " |",
        "|---" * (size + 1) + "|",
    ]
    for t, row in enumerate(matrix):
        cells = [f"{row[k]:.3f}" if k < len(row) and row[k] is not None else "" for k in range(size)]
        lines.append(f"| {names[t]} | " + " | ".join(cells) + " |")
    lines.append("")
    try:
        metrics = summary(matrix)
    except ValueError:
        metrics = None
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {key} | {value:.4f} |" for key, value in metrics.items())]
        lines.append("")
    if plot:
        lines += [f"![accuracy matrix]({PLOT_NAME})", ""]
    return lines


# ---- upload ------------------------------------------------------------------------------------------------------


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise GPHubError(
            "Pushing to the Hub needs a token with write access: set HF_TOKEN, run `hf auth login`, or pass token=."
        )
    return token


def push_task_folder(
    local_dir: str,
    repo_id: str,
    task_id: int | None = None,
    *,
    private: bool = False,
    create_pr: bool = False,
    token: str | None = None,
    subfolder_per_task: bool = False,
    commit_message: str | None = None,
) -> TaskPush:
    """Upload a folder written by ``save_task`` as one commit and point the task's branch at it.

    The commit goes to ``main`` (with ``subfolder_per_task=True`` the task's files go under ``task-03/`` there, the
    card stays at the root), then branch ``task-03`` is created at that commit. With ``create_pr=True`` the commit
    opens a pull request against ``main`` instead and no branch is made: load it with ``revision="refs/pr/N"``
    (``TaskPush.revision``). An existing task branch is never moved: delete it first to re-push a task. This is also
    the retry after a failed push: the folder holds everything.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    tasks_path = os.path.join(local_dir, GP_TASKS_NAME)
    if not os.path.isfile(tasks_path):
        raise FileNotFoundError(
            f"{local_dir} holds no {GP_TASKS_NAME}: it was not written by peft_gp.hub.save_task / push_task_to_hub."
        )
    state = GPTaskState.load(tasks_path)
    if task_id is None:
        task_id = state.tasks_seen - 1
    if not 0 <= task_id < state.tasks_seen:
        raise ValueError(f"task_id={task_id} is not in {tasks_path}, which records {state.tasks_seen} task(s).")
    branch = task_branch(task_id)
    subfolder = branch if subfolder_per_task else None
    retry = (
        f"Nothing trained is lost: task {task_id + 1} is saved in {local_dir}. Retry the upload with "
        f"peft_gp.hub.push_task_folder({local_dir!r}, {repo_id!r}, task_id={task_id}"
        + (", subfolder_per_task=True" if subfolder_per_task else "")
        + (", create_pr=True" if create_pr else "")
        + ")."
    )
    try:
        token = _resolve_token(token)
    except GPHubError as error:
        raise GPHubError(f"{error} {retry}", local_dir=local_dir) from None
    api = HfApi(token=token)
    message = commit_message or f"Task {task_id + 1} ({state.task_names[task_id]}): adapter, GP memory and model card"

    with hub_errors(f"Creating the Hub repo {repo_id!r}", retry, local_dir, token):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
    with hub_errors(f"Checking the base model named in the model card of {local_dir!r}", retry, local_dir, token):
        _drop_unknown_base_model(api, os.path.join(local_dir, MODEL_CARD_NAME))
    if not create_pr:
        with hub_errors(f"Checking branch {branch!r} of {repo_id!r}", retry, local_dir, token):
            exists = api.revision_exists(repo_id, branch)
        if exists:
            raise GPHubError(
                f"{repo_id!r} already has a branch {branch!r}: task {task_id + 1} was pushed before, and a task "
                "branch is never moved. Delete it (HfApi().delete_branch(repo_id, branch)) to re-push this task, or "
                f"push with create_pr=True for review. The task is saved in {local_dir}.",
                local_dir=local_dir,
            )
    operations = []  # built after the card is final: an operation records its file's size and hash
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            if name.startswith(".tmp-"):  # left by an atomic write that was killed
                continue
            path = os.path.join(root, name)
            relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
            in_repo = relative if subfolder is None or relative == MODEL_CARD_NAME else f"{subfolder}/{relative}"
            operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))
    with hub_errors(f"Uploading task {task_id + 1} to {repo_id!r}", retry, local_dir, token):
        commit = api.create_commit(repo_id, operations, commit_message=message, revision="main", create_pr=create_pr)
    if create_pr:
        return TaskPush(repo_id, task_id, commit.pr_revision, subfolder, commit, local_dir)
    with hub_errors(f"Creating branch {branch!r} of {repo_id!r}", retry, local_dir, token):
        api.create_branch(repo_id, branch=branch, revision=commit.oid)
    return TaskPush(repo_id, task_id, branch, subfolder, commit, local_dir)


def _drop_unknown_base_model(api, card_path: str) -> None:
    # The Hub refuses a card whose base_model is not a repo it knows (e.g. a base model loaded from a local folder
    # with a relative name): leave it out rather than fail the push. The local card is updated to match.
    from huggingface_hub import ModelCard

    if not os.path.isfile(card_path):
        return
    card = ModelCard.load(card_path)
    base_model = card.data.base_model
    if isinstance(base_model, str) and not api.repo_exists(base_model):
        card.data.base_model = None
        card.save(card_path)


def push_task_to_hub(
    model: nn.Module,
    repo_id: str,
    task_id: int | None = None,
    task_name: str | None = None,
    *,
    local_dir: str,
    private: bool = False,
    create_pr: bool = False,
    token: str | None = None,
    subfolder_per_task: bool = False,
    classes: list | None = None,
    accuracy_matrix: list[list[float | None]] | None = None,
    plot_path: str | None = None,
    extra_files: list[str] | None = None,
    commit_message: str | None = None,
    adapter_name: str | None = None,
) -> TaskPush:
    """Save task ``task_id`` to ``local_dir``, then push it to ``repo_id`` as one commit with branch ``task-XX``.

    Args:
        model: the PEFT model built from a GP config, with the finished task stored in its memory.
        repo_id: the Hub repo (created if missing, with ``private``).
        task_id: 0-based; defaults to the last task stored in the memory. Its branch is ``task_branch(task_id)``,
            1-based: ``task-01`` is the first task.
        task_name: shown in the model card, ``gp_tasks.json`` and the commit message (default: the branch name).
        local_dir: written first, whatever happens on the network; a failed push is retried from it with
            ``push_task_folder``.
        private, create_pr, token, subfolder_per_task, commit_message: see ``push_task_folder``. The token defaults
            to ``HF_TOKEN`` or the saved login; it is never printed.
        classes: the labels of this task (recorded in ``gp_tasks.json``: the classes seen so far).
        accuracy_matrix: ``R[t][k]`` so far, shown in the card as a table, with its metrics and plot.
        plot_path: a PNG of the accuracy matrix to use instead of drawing one.
        extra_files: more files to put beside the adapter (e.g. a training log).
        adapter_name: the adapter to push (default: the active one).
    """
    task_id = save_task(
        model,
        local_dir,
        task_id,
        task_name,
        classes=classes,
        accuracy_matrix=accuracy_matrix,
        plot_path=plot_path,
        extra_files=extra_files,
        repo_id=repo_id,
        adapter_name=adapter_name,
    )
    return push_task_folder(
        local_dir,
        repo_id,
        task_id,
        private=private,
        create_pr=create_pr,
        token=token,
        subfolder_per_task=subfolder_per_task,
        commit_message=commit_message,
    )

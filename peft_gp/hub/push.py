"""Share each task's checkpoint on the Hugging Face Hub: one commit and one branch per task, with a model card.

``push_task_to_hub(model, repo_id, local_dir=...)`` first saves the task locally (adapter weights, head,
``gp_memory.safetensors``, ``gp_tasks.json`` and ``README.md``), then uploads that folder in one commit to ``main``
and points the branch ``task-03`` (1-based, two digits: ``task_branch(task_id)``) at it. Anyone can then pick the
sequence up at that task with ``peft_gp.from_pretrained(base, repo_id, revision="task-03", is_trainable=True)``.
If the upload fails, nothing trained is lost: ``GPHubError`` says what failed, where the local copy is and how to
retry with ``push_task_folder(local_dir, repo_id)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.hub_errors import GPHubError, hub_errors, raise_unchained, redacted_logs
from ..wiring.task_record import GP_TASKS_NAME, GPTaskState
from .checks import check_repo_id
from .manifest import MODEL_CARD_NAME, files_to_push, task_branch
from .save import save_task


@dataclass
class TaskPush:
    """What ``push_task_to_hub`` made: load it back with ``from_pretrained(base, repo_id, revision, subfolder)``."""

    repo_id: str
    task_id: int
    revision: str  # the task branch, or ``refs/pr/N`` with ``create_pr=True``
    subfolder: str | None
    commit: Any  # huggingface_hub.CommitInfo (oid, commit_url, pr_url)
    local_dir: str


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

    Only the files the task save wrote are uploaded (listed in its ``gp_push_files.json``); a folder that holds
    anything else is refused with a ``ValueError`` naming the files, before any request. The token never appears in
    an error (nor in its chained errors) or in a log record of the Hub client while the push runs.
    """
    check_repo_id(repo_id)
    files = files_to_push(local_dir)
    tasks_path = os.path.join(local_dir, GP_TASKS_NAME)
    if GP_TASKS_NAME not in files:
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
    retry = _retry_text(local_dir, repo_id, task_id, subfolder_per_task, create_pr)
    try:
        token = _resolve_token(token)
    except GPHubError as error:
        raise_unchained(GPHubError(f"{error} {retry}", local_dir=local_dir))
    name = _one_line(state.task_names[task_id])
    message = commit_message or f"Task {task_id + 1} ({name}): adapter, GP memory and model card"
    with redacted_logs(token):
        return _push(local_dir, files, repo_id, task_id, branch, subfolder, message, private, create_pr, retry, token)


def _push(local_dir, files, repo_id, task_id, branch, subfolder, message, private, create_pr, retry, token):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors(f"Creating the Hub repo {repo_id!r}", retry, local_dir, token):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
    with hub_errors(f"Checking the base model named in the model card of {local_dir!r}", retry, local_dir, token):
        _drop_unknown_base_model(api, os.path.join(local_dir, MODEL_CARD_NAME))
    if not create_pr:
        _refuse_existing_branch(api, repo_id, branch, task_id, local_dir, retry, token)
    operations = _operations(local_dir, files, subfolder)  # after the card is final: each records its file's hash
    with hub_errors(f"Uploading task {task_id + 1} to {repo_id!r}", retry, local_dir, token):
        commit = api.create_commit(repo_id, operations, commit_message=message, revision="main", create_pr=create_pr)
    if create_pr:
        return TaskPush(repo_id, task_id, commit.pr_revision, subfolder, commit, local_dir)
    with hub_errors(f"Creating branch {branch!r} of {repo_id!r}", retry, local_dir, token):
        api.create_branch(repo_id, branch=branch, revision=commit.oid)
    return TaskPush(repo_id, task_id, branch, subfolder, commit, local_dir)


def _one_line(text) -> str:
    """A task name in a commit message: one line, at most 100 characters."""
    words = " ".join(str(text).split())
    return words if len(words) <= 100 else words[:99] + "…"


def _retry_text(local_dir: str, repo_id: str, task_id: int, subfolder_per_task: bool, create_pr: bool) -> str:
    options = (", subfolder_per_task=True" if subfolder_per_task else "") + (", create_pr=True" if create_pr else "")
    return (
        f"Nothing trained is lost: task {task_id + 1} is saved in {local_dir}. Retry the upload with "
        f"peft_gp.hub.push_task_folder({local_dir!r}, {repo_id!r}, task_id={task_id}{options})."
    )


def _refuse_existing_branch(api, repo_id: str, branch: str, task_id: int, local_dir: str, retry: str, token) -> None:
    with hub_errors(f"Checking branch {branch!r} of {repo_id!r}", retry, local_dir, token):
        exists = api.revision_exists(repo_id, branch)
    if exists:
        raise GPHubError(
            f"{repo_id!r} already has a branch {branch!r}: task {task_id + 1} was pushed before, and a task branch "
            "is never moved. Delete it (HfApi().delete_branch(repo_id, branch)) to re-push this task, or push with "
            f"create_pr=True for review. The task is saved in {local_dir}.",
            local_dir=local_dir,
        )


def _operations(local_dir: str, files: list[str], subfolder: str | None) -> list:
    """One upload per file of the task save (the card at the root, the rest under ``subfolder`` when given)."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for relative in sorted(files):
        path = os.path.join(local_dir, *relative.split("/"))
        in_repo = relative if subfolder is None or relative == MODEL_CARD_NAME else f"{subfolder}/{relative}"
        operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))
    return operations


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
        extra_files: more files to put beside the adapter (e.g. a training log); not one named like the task's own
            files, never torch.save files (``*.bin``, ``*.pt``, ``*.pth``, ``training_args*``), hidden files, keys.
        adapter_name: the adapter to push (default: the active one).

    Arguments and ``local_dir`` (new, empty or an earlier task save) are checked before anything is written.
    """
    check_repo_id(repo_id)
    task_id = save_task(model, local_dir, task_id, task_name, classes=classes, accuracy_matrix=accuracy_matrix,
                        plot_path=plot_path, extra_files=extra_files, repo_id=repo_id, adapter_name=adapter_name)
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

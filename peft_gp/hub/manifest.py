"""What a push may upload: the files ``save_task`` wrote, listed in a manifest it writes last, and nothing else.

``save_task`` refuses a ``local_dir`` that already holds files it did not write (a Trainer's ``output_dir`` holds
``training_args.bin``, which holds the Hub token; a home folder holds ``.env`` or ``id_rsa``), and refuses extra
files that would replace one of its own files. ``push_task_folder`` uploads exactly the files of the manifest, and
refuses a folder that holds anything else, or a manifest that lists a file no task save writes (``*.bin``, ``*.pt``,
``*.pth``, ``*.pkl``, ``training_args*``, hidden files, keys).
"""

from __future__ import annotations

import fnmatch
import json
import os

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..wiring.memory import GP_MEMORY_NAME
from ..wiring.task_record import GP_TASKS_NAME, default_task_name

MODEL_CARD_NAME = "README.md"
PLOT_NAME = "gp_accuracy_matrix.png"

MANIFEST_NAME = "gp_push_files.json"
MANIFEST_VERSION = 1
# the names a task save writes itself: an extra file may not replace them
RESERVED_NAMES = frozenset(
    {SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME, GP_MEMORY_NAME, GP_TASKS_NAME, MODEL_CARD_NAME, PLOT_NAME, MANIFEST_NAME}
)
# never uploaded, even when listed: torch.save and other Python-serialised files (the Trainer's training_args.bin
# holds the token), hidden files (.env, .git, .ssh) and private keys
NEVER_PUSHED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "training_args*", ".*", "id_rsa*",
                "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12")  # fmt: skip
_SHOWN = 12


def task_branch(task_id: int) -> str:
    """The Hub branch of task ``task_id`` (0-based): ``task-01`` for the first task."""
    return default_task_name(task_id)


def never_pushed(relative_path: str) -> str | None:
    """The ``NEVER_PUSHED`` pattern that a part of ``relative_path`` matches, or ``None``."""
    for part in relative_path.replace(os.sep, "/").split("/"):
        for pattern in NEVER_PUSHED:
            if fnmatch.fnmatch(part.lower(), pattern):
                return pattern
    return None


def _listing(paths) -> str:
    paths = sorted(paths)
    shown = ", ".join(repr(path) for path in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def folder_files(folder: str) -> list[str]:
    """Every file below ``folder`` (relative, ``/``-separated), symbolic links included, folders not."""
    found = []
    for root, dirs, files in os.walk(folder):
        links = [name for name in dirs if os.path.islink(os.path.join(root, name))]
        for name in [*files, *links]:
            found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def check_extra_files(extra_files) -> list[str]:
    """The ``extra_files`` of a task save, checked before anything is written: files that exist, with distinct
    names that a task save does not write itself and that are never pushed (torch.save files, hidden files, keys)."""
    if extra_files is None:
        return []
    if isinstance(extra_files, (str, bytes, os.PathLike)):
        extra_files = [extra_files]
    paths = [os.fspath(path) for path in extra_files]
    names: dict[str, str] = {}
    for path in paths:
        name = os.path.basename(path)
        if not os.path.isfile(path):
            raise ValueError(f"extra_files: {path!r} is not a file. Nothing was written.")
        if name.lower() in {reserved.lower() for reserved in RESERVED_NAMES}:
            raise ValueError(
                f"extra_files: {path!r} would replace the task's own {name}, which the save writes itself. Rename the "
                "extra file (e.g. notes-" + name + "). Nothing was written."
            )
        pattern = never_pushed(name)
        if pattern:
            raise ValueError(
                f"extra_files: {path!r} matches {pattern!r}, a kind of file that is never pushed (torch.save files "
                "such as training_args.bin hold the Hub token; hidden files and keys hold secrets). Nothing written."
            )
        if name.lower() in names:
            raise ValueError(f"extra_files: {names[name.lower()]!r} and {path!r} have the same name {name!r}.")
        names[name.lower()] = path
    return paths


def read_manifest(folder: str) -> list[str] | None:
    """The files listed by the manifest of ``folder`` (``None`` without one); a damaged one is a ``ValueError``."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    fix = "Save the task again (peft_gp.hub.save_task or push_task_to_hub) into a new folder."
    try:
        if os.path.getsize(path) > 2**20:
            raise ValueError("too large")
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}). {fix}") from None
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) and name for name in files):
        raise ValueError(f"{path} is not a valid {MANIFEST_NAME}: it needs a list of file names. {fix}")
    if not isinstance(raw.get("gp_format_version"), int) or raw["gp_format_version"] > MANIFEST_VERSION:
        raise ValueError(f"{path} has an unknown format version {raw.get('gp_format_version')!r}. {fix}")
    return files


def write_manifest(folder: str) -> list[str]:
    """List every file of ``folder`` (the complete task save) in its manifest; returns the list."""
    files = [name for name in folder_files(folder) if name != MANIFEST_NAME]
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as handle:
        json.dump({"gp_format_version": MANIFEST_VERSION, "files": files}, handle, indent=2)
        handle.write("\n")
    return files


def check_save_folder(local_dir: str) -> None:
    """Refuse to save a task into a folder that holds files other than an earlier task save's.

    Files listed in its manifest, and files named like a task save's own (an older save without a manifest), are
    replaced by the new save; anything else means the folder is not a task folder.
    """
    if not os.path.lexists(local_dir):
        return
    if not os.path.isdir(local_dir) or os.path.islink(local_dir):
        raise ValueError(f"local_dir={local_dir!r} is not a folder. Pass a new or empty folder for the task's files.")
    listed = set(read_manifest(local_dir) or [])
    foreign = [
        name
        for name in folder_files(local_dir)
        if name != MANIFEST_NAME and name not in listed and os.path.basename(name) not in RESERVED_NAMES
    ]
    if foreign:
        raise ValueError(
            f"local_dir={local_dir!r} holds files that a task save did not write: {_listing(foreign)}. The task's "
            "folder is pushed as a whole, so it must hold nothing else. Pass a new or empty folder (GPTrainer uses "
            "<output_dir>/hub/task-XX); put files you mean to publish in extra_files=. Nothing was written."
        )


def files_to_push(local_dir: str) -> list[str]:
    """The files of ``local_dir`` to upload: exactly those of its manifest, each a plain file inside the folder.

    Raises ``ValueError`` naming the files when the folder has no manifest, holds anything else, lacks a listed
    file, or when the manifest lists a file that is never pushed.
    """
    fix = "Save the task again with peft_gp.hub.save_task / push_task_to_hub into a new folder."
    listed = read_manifest(local_dir) if os.path.isdir(local_dir) else None
    if listed is None:
        raise ValueError(
            f"{local_dir!r} holds no {MANIFEST_NAME}: it is not a complete task folder written by "
            f"peft_gp.hub.save_task / push_task_to_hub, and only such a folder is pushed. {fix}"
        )
    unsafe = [name for name in listed if _outside(name) or never_pushed(name)]
    if unsafe:
        raise ValueError(
            f"{os.path.join(local_dir, MANIFEST_NAME)} lists files that are never pushed: {_listing(unsafe)} "
            "(torch.save files such as training_args.bin hold the Hub token; hidden files and keys hold secrets; "
            f"paths must stay inside the folder). Nothing was sent. {fix}"
        )
    present = set(folder_files(local_dir)) - {MANIFEST_NAME}
    extra = present - set(listed)
    if extra:
        raise ValueError(
            f"{local_dir!r} holds files that the task save did not write: {_listing(extra)}. Only the task's own "
            "files are pushed, and a folder holding anything else is refused rather than published. Move them out, "
            f"or save them with the task (extra_files=). Nothing was sent."
        )
    missing = [name for name in listed if name not in present or not _plain_file(local_dir, name)]
    if missing:
        raise ValueError(
            f"{local_dir!r} lacks files of its task save, or they are not plain files: {_listing(missing)}. "
            f"Nothing was sent. {fix}"
        )
    return list(listed)


def _outside(name: str) -> bool:
    parts = name.split("/")
    return name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts)


def _plain_file(folder: str, name: str) -> bool:
    path = os.path.join(folder, *name.split("/"))
    return os.path.isfile(path) and not os.path.islink(path)

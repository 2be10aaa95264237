"""Persistence: ``gp_memory.safetensors`` and ``gp_tasks.json`` beside PEFT's adapter files.

``peft_gp.save_pretrained(model, dir)`` writes PEFT's files, then the memory and task record of each GP adapter;
``GPCallback`` writes them into every Trainer checkpoint. The adapter files themselves stay exactly PEFT's, so plain
``PeftModel.from_pretrained`` loads them for inference; ``peft_gp.from_pretrained`` restores the memory too.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import fields

from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..core.files import read_json, replace_directory, sha256_file, sibling_temporary_folder
from ..core.hub_errors import hub_errors
from ..core.peft_utils import adapter_directory, unwrap_peft_model
from .attention import vocabulary_for_prefix
from .checkpoints import GP_CHECKPOINT_NAME
from .class_stats import GP_CLASS_STATS_NAME, ClassStatistics
from .config import GP_CONFIG_CLASSES, is_gp_config
from .consistency import check_saved_together
from .memory import GP_MEMORY_NAME, GPMemory, GPMemoryError
from .state import get_memory, get_state, get_task_state, has_task_state, set_memory, set_task_state
from .task_record import GP_TASKS_NAME, GPTaskState

# what a save decides about: never carried over from an older save of the same folder
MANAGED_FILES = frozenset((SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME, "README.md"))
MANAGED_FILES |= {GP_MEMORY_NAME, GP_TASKS_NAME, GP_CHECKPOINT_NAME, GP_CLASS_STATS_NAME}


def save_memory(model: nn.Module, save_directory: str, adapter_name: str | None = None) -> str:
    """Write the memory of ``adapter_name`` (default: active) to ``gp_memory.safetensors``; returns the path.

    When the adapter's weights are already in that folder, their SHA-256 goes into the memory's metadata, so that a
    memory and an adapter from different saves are told apart on load.
    """
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    folder = adapter_directory(save_directory, adapter_name)
    path = os.path.join(folder, GP_MEMORY_NAME)
    get_memory(peft_model, adapter_name).save(path, adapter_sha256=_weights_sha256(folder))
    return path


def _weights_sha256(folder: str) -> str | None:
    weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    return sha256_file(weights) if os.path.isfile(weights) else None


def save_gp_files(model: nn.Module, save_directory: str, adapter_name: str | None = None) -> None:
    """Write the memory and (once a task is recorded) the task record of ``adapter_name`` beside its adapter."""
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    save_memory(peft_model, save_directory, adapter_name)
    stats = get_state(peft_model, adapter_name).class_stats
    if stats is not None:
        stats.save(os.path.join(adapter_directory(save_directory, adapter_name), GP_CLASS_STATS_NAME))
    if has_task_state(peft_model, adapter_name):
        folder = adapter_directory(save_directory, adapter_name)
        tasks = get_task_state(peft_model, adapter_name)
        tasks.adapter_sha256 = _weights_sha256(folder)
        tasks.save(os.path.join(folder, GP_TASKS_NAME))


def save_pretrained(model: nn.Module, save_directory: str, **kwargs) -> None:
    """PEFT's ``save_pretrained`` and each GP adapter's memory and task record, put in place as one folder.

    Everything is written to a temporary folder beside ``save_directory``, which then replaces it in one step
    (``core.files.replace_directory``): killed at any moment, the folder holds the previous save or this one, never
    a mix. Other files already in ``save_directory`` are kept. ``kwargs`` go to PEFT's ``save_pretrained``; only the
    main process writes (``is_main_process``).
    """
    peft_model = unwrap_peft_model(model)
    if not kwargs.get("is_main_process", True):
        return
    temporary = sibling_temporary_folder(save_directory)
    try:
        peft_model.save_pretrained(temporary, **kwargs)
        for adapter_name in kwargs.get("selected_adapters") or list(peft_model.peft_config):
            if is_gp_config(peft_model.peft_config[adapter_name]):
                save_gp_files(peft_model, temporary, adapter_name)
        replace_directory(temporary, save_directory, MANAGED_FILES)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _resolve_file(
    model_id: str, filename: str, revision: str | None, subfolder: str | None, optional: bool = False
) -> str | None:
    """Local path of ``filename`` in a folder or Hub repo, or ``None`` if it is not there.

    A file the Hub says is missing gives ``None``; so does one that is neither reachable nor cached when
    ``optional`` (otherwise the network error propagates: "missing" and "unreachable" need different fixes).
    """
    local = os.path.join(model_id, subfolder or "", filename)
    if os.path.isdir(model_id):
        return local if os.path.isfile(local) else None
    if _path_like(model_id):
        raise FileNotFoundError(
            f"{model_id!r} is not a folder. Give the folder save_pretrained wrote (it holds {CONFIG_NAME}, "
            f"{SAFETENSORS_WEIGHTS_NAME} and {GP_MEMORY_NAME}), or a Hub repo id such as 'user/name'."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return hf_hub_download(model_id, filename, subfolder=subfolder or None, revision=revision)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"{model_id!r} is neither a local folder nor a valid Hub repo id ({str(error).splitlines()[0]}). Give the "
            "folder save_pretrained wrote, or a Hub repo id such as 'user/name'."
        ) from None
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        if optional:
            return None
        raise


def _path_like(model_id: str) -> bool:
    """``model_id`` names a local path, not a Hub repo id (``user/name``): absolute, relative, home or deeper."""
    return os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1 or (
        os.path.exists(model_id))  # fmt: skip


def load_gp_config(model_id: str, revision: str | None = None, subfolder: str | None = None):
    """Read ``adapter_config.json`` as the matching ``GP*Config`` (errors if it was not saved by peft_gp)."""
    path = _resolve_file(model_id, CONFIG_NAME, revision, subfolder)
    if path is None:
        raise FileNotFoundError(f"No {CONFIG_NAME} in {model_id!r} (subfolder={subfolder!r}, revision={revision!r}).")
    raw = read_json(path, f"It is not a valid {CONFIG_NAME}: restore the adapter folder from its save.")
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object: not a valid {CONFIG_NAME}.")
    peft_type = raw.get("peft_type")
    if peft_type not in GP_CONFIG_CLASSES:
        raise ValueError(f"{path}: peft_gp supports peft_type {sorted(GP_CONFIG_CLASSES)}, got {peft_type!r}.")
    if not any(key.startswith("gp_") for key in raw):
        raise ValueError(
            f"{path} has no gp_* settings: this adapter was not saved by peft_gp, so it has no memory. Load it with "
            "peft.PeftModel.from_pretrained, or start a new GP adapter with get_peft_model(model, GPLoraConfig(...))."
        )
    config_cls = GP_CONFIG_CLASSES[peft_type]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(key for key in raw if key.startswith("gp_") and key not in known)
    if unknown:
        raise ValueError(
            f"{path} has gp_* settings this peft_gp does not know: {unknown}. A newer peft_gp wrote it (pip install "
            "-U peft-gp), or the file was edited: remove the unknown keys."
        )
    return config_cls(**{key: value for key, value in raw.items() if key in known})


def load_memory(
    model: nn.Module,
    model_id: str,
    adapter_name: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
) -> GPMemory:
    """Read ``gp_memory.safetensors`` from a folder or Hub repo, check it fits the model, and attach it."""
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    path = _resolve_file(model_id, GP_MEMORY_NAME, revision, subfolder)
    if path is None:
        raise GPMemoryError(
            f"No {GP_MEMORY_NAME} in {model_id!r} (subfolder={subfolder!r}, revision={revision!r}). Without it the "
            "earlier tasks are not protected. Point to the directory written by save_pretrained or by a GPTrainer "
            "checkpoint (it holds adapter_model.safetensors and gp_memory.safetensors side by side)."
        )
    memory = GPMemory.load(path)
    set_memory(peft_model, memory, adapter_name, source=path)
    return memory


def load_task_state(
    model: nn.Module,
    model_id: str,
    adapter_name: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
) -> GPTaskState | None:
    """Read ``gp_tasks.json`` (task names, classes seen, accuracy matrix) and attach it; ``None`` if there is none."""
    path = _resolve_file(model_id, GP_TASKS_NAME, revision, subfolder, optional=True)
    if path is None:
        return None
    state = GPTaskState.load(path)
    set_task_state(model, state, adapter_name)
    return state


def adapter_weights(model_id: str, revision: str | None = None, subfolder: str | None = None) -> str:
    """The local path of ``adapter_model.safetensors``; a folder that has only PEFT's ``.bin`` file is refused."""
    path = _resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, revision, subfolder)
    if path is not None:
        return path
    if _resolve_file(model_id, WEIGHTS_NAME, revision, subfolder, optional=True) is not None:
        raise ValueError(
            f"{model_id!r} holds the adapter only as {WEIGHTS_NAME}, a torch-serialised file that can run code on "
            f"load, which peft_gp never reads. Save it as {SAFETENSORS_WEIGHTS_NAME} (peft_gp.save_pretrained, or "
            "PEFT's save_pretrained with safe_serialization=True) from a source you trust."
        )
    raise FileNotFoundError(f"No {SAFETENSORS_WEIGHTS_NAME} in {model_id!r} (subfolder={subfolder!r}).")


def load_gp_files(
    model: nn.Module,
    model_id: str,
    adapter_name: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
) -> tuple[GPMemory, GPTaskState | None]:
    """Load the memory and the task record of a save, after checking that they and the adapter weights beside them
    come from one save (``check_saved_together``); attach both."""
    memory = load_memory(model, model_id, adapter_name, revision, subfolder)
    tasks = load_task_state(model, model_id, adapter_name, revision, subfolder)
    weights = _resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, revision, subfolder, optional=True)
    where = f"{model_id!r}" + (f" ({subfolder})" if subfolder else "")
    check_saved_together(memory, tasks, weights, where)
    stats_path = _resolve_file(model_id, GP_CLASS_STATS_NAME, revision, subfolder, optional=True)
    if stats_path is not None:
        stats = ClassStatistics.load(stats_path)
        if stats.tasks_seen != memory.tasks_seen:
            raise GPMemoryError(
                f"{GP_CLASS_STATS_NAME} in {where} holds {stats.tasks_seen} task(s), the memory {memory.tasks_seen}: "
                "they come from different saves. Restore both from one save."
            )
        get_state(model, adapter_name).class_stats = stats
    return memory, tasks


def _make_prompt_trainable(model: PeftModel, adapter_name: str) -> None:
    """What ``get_peft_model`` leaves trainable for a prompt-learning adapter: its prompt encoder and its
    ``modules_to_save`` copies (a classifier head)."""
    model.peft_config[adapter_name].inference_mode = False
    for param in model.prompt_encoder[adapter_name].parameters():
        param.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for param in module.modules_to_save[adapter_name].parameters():
                param.requires_grad_(True)


def from_pretrained(
    base_model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    **kwargs,
) -> PeftModel:
    """Load a peft_gp adapter with its GP config, memory and task record, ready for inference or the next task.

    Args:
        base_model: the base ``transformers`` model the adapter was trained on.
        model_id: a local folder or a Hub repo id holding ``adapter_model.safetensors``, ``adapter_config.json`` and
            ``gp_memory.safetensors``.
        adapter_name: name to give the loaded adapter.
        is_trainable: ``True`` to continue training (the next task); ``False`` for inference.
        revision: Hub revision (branch, tag or commit), e.g. ``"task-03"`` for a checkpoint pushed by
            ``peft_gp.hub.push_task_to_hub`` after the third task.
        subfolder: subfolder of ``model_id`` holding the files.
        kwargs: passed on to ``PeftModel.from_pretrained``.

    The task record (``gp_tasks.json``) is attached when present: ``peft_gp.get_task_state(model)``. Hub failures
    (network down, no access, unknown revision) raise ``peft_gp.hub.GPHubError`` saying what to fix.
    """
    model_id = os.path.expanduser(os.fspath(model_id))  # a Path or "~/runs/final" names a folder too
    where = f"{model_id!r}" + (f" at revision {revision!r}" if revision else "")
    where += "" if os.path.isdir(model_id) else " (there is no local folder of that name)"
    with hub_errors(f"Loading {where} from the Hub"):
        config = load_gp_config(model_id, revision=revision, subfolder=subfolder)
        adapter_weights(model_id, revision, subfolder)  # safetensors only, checked before PEFT falls back to .bin
        hub_kwargs = {key: value for key, value in (("revision", revision), ("subfolder", subfolder)) if value}
        # PEFT refuses is_trainable=True for prompt learning: load for inference, then make the prompt trainable
        prompt_learning = config.is_prompt_learning
        with vocabulary_for_prefix(base_model, config):
            model = PeftModel.from_pretrained(
                base_model,
                model_id,
                adapter_name=adapter_name,
                is_trainable=is_trainable and not prompt_learning,
                config=config,
                **hub_kwargs,
                **kwargs,
            )
        if is_trainable and prompt_learning:
            _make_prompt_trainable(model, adapter_name)
        load_gp_files(model, model_id, adapter_name, revision, subfolder)
    get_state(model, adapter_name)  # the prefix route, when there is one, is in place before the first forward
    return model

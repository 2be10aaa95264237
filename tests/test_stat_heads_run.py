"""Statistics heads in ``run_sequence`` (issue 22): heads from class statistics beside the trained head, the frozen
encoder as a peer, one forward pass for all of them, and the config's checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import RobertaConfig, RobertaForSequenceClassification

import peft_gp
from peft_gp.continual import (
    RunConfig,
    RunConfigError,
    accuracy_matrix_summary,
    class_incremental_split,
    run_sequence,
)
from peft_gp.continual.heads import prediction_classes
from peft_gp.continual.loading import prepare
from peft_gp.continual.stat_heads import build_heads, evaluate_heads, take_statistics
from peft_gp.wiring.class_stats import head_module
from peft_gp.wiring.memory_data import memory_sample
from peft_gp.wiring.state import get_state
from tests.testing import SILENT, tiny_run_config

HEADS = ["trained", "lda", "ncm", "aligned"]


def tiny_config(tiny_dirs, tmp_path, **changes) -> RunConfig:
    return tiny_run_config(tiny_dirs, tmp_path, **{"name": "heads", "epochs": 6, "plots": False, **changes})


@pytest.fixture(scope="module")
def heads_run(tiny_dirs, tmp_path_factory):
    config = tiny_config(tiny_dirs, tmp_path_factory.mktemp("run"), heads=HEADS, compare_baseline=True,
                         compare_frozen=True)  # fmt: skip
    return config, run_sequence(config, **SILENT)


def test_every_method_is_read_with_every_head(heads_run):
    config, run = heads_run
    assert list(run.results) == ["gp", "baseline", "frozen"]
    for name, result in run.results.items():
        expected = ["ncm", "aligned"] if name == "frozen" else ["lda", "ncm", "aligned"]
        assert list(result.head_matrices) == expected
        for views in result.head_matrices.values():
            for matrix in views.values():
                assert len(matrix) == 3 and all(v is None for v in matrix[0][1:])
                assert all(0.0 <= v <= 1.0 for row in matrix for v in row if v is not None)
            # a prediction right over all seen classes is right over the task's own two
            assert all(views["task"][t][k] >= views["class"][t][k] for t in range(3) for k in range(t + 1))
    assert run.results["gp"].head == "trained" and run.results["frozen"].head == "lda"
    assert run.results["frozen"].model is None and run.results["frozen"].tasks == []
    saved = json.loads((config.run_dir / "result.json").read_text())
    gp = saved["results"]["gp"]
    assert gp["head_matrices"] == run.results["gp"].head_matrices
    assert gp["head_metrics"]["lda"]["class"] == pytest.approx(
        accuracy_matrix_summary(run.results["gp"].head_matrices["lda"]["class"])
    )
    summary = (config.run_dir / "summary.md").read_text()
    for label in ("| GP-LoRA + LDA |", "| LoRA (no GP) + NCM |", "| Frozen encoder + LDA |",
                  "| Frozen encoder + aligned head |"):  # fmt: skip
        assert label in summary
    # the GP run took its statistics in the memory update: one task's worth per task, all classes
    stats = get_state(run.results["gp"].model).class_stats
    assert stats.tasks_seen == 3 and sorted(stats.labels) == list(range(6))


def test_a_statistics_head_scores_as_if_written_into_the_model(heads_run, tiny_dirs):
    """The run's scoring of a statistics head (pooled features x its weights) predicts exactly what the model
    predicts once that head is written into its classification layer (``peft_gp.apply_statistics_head``)."""
    config, run = heads_run
    model = run.results["gp"].model
    encoded, _ = prepare(config)
    stats = get_state(model).class_stats
    heads = build_heads(stats, ["lda"], head_module(model), config.seed)
    views = [prediction_classes(encoded, 2, k, "class") for k in range(3)]
    scored = [evaluate_heads(model, encoded[k].test, [views[k]], heads, 8)["lda"][0] for k in range(3)]
    assert scored == pytest.approx([row for row in run.results["gp"].head_matrices["lda"]["class"][2]])
    with torch.no_grad():
        peft_gp.apply_statistics_head(model, "lda")
    written = [evaluate_heads(model, encoded[k].test, [views[k]], {}, 8)["trained"][0] for k in range(3)]
    assert written == pytest.approx(scored)


def test_frozen_statistics_are_the_base_models_features(heads_run, tiny_dirs):
    """The frozen encoder's class means are the base model's pooled features averaged per class."""
    config, _ = heads_run
    encoded, base = prepare(config)
    task = encoded[0]
    peft_model = peft_gp.get_peft_model(
        copy.deepcopy(base), peft_gp.GPLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"])
    )
    stats = take_statistics(peft_model, task.train, 32, config.seed, 8)
    sample = memory_sample(task.train, 32, config.seed)
    base.eval()
    with torch.no_grad():
        pooled = base.bert(input_ids=torch.tensor(sample["input_ids"]),
                           attention_mask=torch.tensor(sample["attention_mask"])).pooler_output  # fmt: skip
    labels = sample["labels"] if "labels" in sample.column_names else sample["label"]
    for row, label in enumerate(stats.labels):
        chosen = torch.tensor([value == label for value in labels])
        assert stats.counts[row] == chosen.sum()
        torch.testing.assert_close(stats.means[row].float(), pooled[chosen].mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(heads=["lda", "knn"]), "Unknown head"),
        (dict(heads=["lda", "lda"]), "distinct"),
        (dict(heads=[]), "non-empty"),
        (dict(compare_frozen=True, heads=["trained"]), "compare_frozen"),
        (dict(compare_frozen=True, scenario="task"), "compare_frozen"),
        (dict(heads=["lda"], scenario="generative"), "generative"),
    ],
)
def test_bad_heads_are_refused_with_the_fix(changes, message, tmp_path):
    with pytest.raises(RunConfigError, match=message):
        RunConfig(**changes)


def test_a_single_head_may_be_a_string():
    assert RunConfig(heads="lda").heads == ["lda"] and RunConfig(heads="lda").statistics_heads == ["lda"]


def test_a_model_whose_head_is_not_linear_runs_with_the_trained_head_and_refuses_statistics_heads(tmp_path):
    """RoBERTa's classifier is a small MLP: statistics heads cannot replace its rows, so asking for them is refused
    before training, and without them the run is as before (evaluation does not look for a linear head)."""
    generator = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "attention_mask": [], "label": []}
    for label in range(4):
        for _ in range(6):
            rows["input_ids"].append([0] + (5 + 4 * label + torch.randint(0, 4, (5,), generator=generator)).tolist())
            rows["attention_mask"].append([1] * 6)
            rows["label"].append(label)
    data = Dataset.from_dict(rows)
    tasks = class_incremental_split(DatasetDict(train=data, test=data), classes_per_task=[2, 2])
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(
        RobertaConfig(vocab_size=24, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=12, num_labels=4, pad_token_id=1)
    )  # fmt: skip
    config = RunConfig(name="roberta", epochs=1, batch_size=4, plots=False, progress=False, gp_memory_samples=8,
                       output_dir=str(tmp_path / "out"),
                       paradigm_kwargs={"target_modules": ["query", "value"]})  # fmt: skip
    run = run_sequence(config, tasks=tasks, model=model, **SILENT)
    assert len(run.accuracy_matrix) == 2 and run.main.head_matrices is None
    with pytest.raises(RunConfigError, match="linear classification head"):
        run_sequence(config.replace(heads=["trained", "lda"]), tasks=tasks, model=model, **SILENT)
    with pytest.raises(RunConfigError, match="compare_frozen needs statistics heads.*'classifier'"):
        run_sequence(config.replace(compare_frozen=True), tasks=tasks, model=model, **SILENT)

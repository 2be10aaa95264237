"""``run_sequence`` end to end on tiny models: the accuracy matrix, its metrics, the files, and the GP effect."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import BertConfig, BertForSequenceClassification, BertModel

import peft_gp
from peft_gp.continual import (
    PARADIGMS,
    RunConfig,
    RunConfigError,
    accuracy_matrix_summary,
    class_incremental_split,
    run_sequence,
)
from peft_gp.continual.loading import load_model, peft_config_for
from tests.testing import SILENT, tiny_run_config


def check_matrix(matrix, tasks):
    assert len(matrix) == tasks
    for t, row in enumerate(matrix):
        assert len(row) == tasks
        assert all(0.0 <= v <= 1.0 for v in row[: t + 1]) and all(v is None for v in row[t + 1 :])


def test_run_writes_consistent_outputs_and_gp_keeps_old_tasks(tiny_dirs, tmp_path):
    config = tiny_run_config(tiny_dirs, tmp_path, compare_baseline=True, save_adapters=True)
    run = run_sequence(config, **SILENT)
    assert list(run.results) == ["gp", "baseline"]
    assert run.info["same_initial_weights"] is True
    for result in run.results.values():
        check_matrix(result.accuracy_matrix, 3)
        assert result.metrics == pytest.approx(accuracy_matrix_summary(result.accuracy_matrix))
        assert [r["task_id"] for r in result.tasks] == [0, 1, 2] and all(r["train_seconds"] > 0 for r in result.tasks)
        # the task-incremental view of the same models: a prediction right over all seen classes is right over the
        # task's own classes too, and after the first task both views restrict to the same classes
        til = result.task_il_matrix
        check_matrix(til, 3)
        assert all(til[t][k] >= result.accuracy_matrix[t][k] for t in range(3) for k in range(t + 1))
        assert til[0][0] == result.accuracy_matrix[0][0]
    gp, plain = run.results["gp"], run.baseline
    assert all(r["memory_update_seconds"] > 0 for r in gp.tasks)
    # the first task is learned, and plain LoRA forgets it while GP keeps more of it
    assert gp.accuracy_matrix[0][0] >= 0.75 and plain.accuracy_matrix[0][0] >= 0.75
    assert gp.accuracy_matrix[2][0] > plain.accuracy_matrix[2][0]
    assert gp.metrics["forgetting"] < plain.metrics["forgetting"]

    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["results"]["gp"]["accuracy_matrix"] == gp.accuracy_matrix
    assert saved["results"]["gp"]["metrics"] == pytest.approx(accuracy_matrix_summary(gp.accuracy_matrix))
    assert saved["results"]["gp"]["task_il_metrics"] == pytest.approx(accuracy_matrix_summary(gp.task_il_matrix))
    assert run.config.heads == ["lda", "trained"] and config.heads is None  # the class scenario's default heads
    assert RunConfig.from_dict(saved["config"]) == config.replace(heads=["lda", "trained"])
    assert [t["class_names"] for t in saved["stream"]] == [t["class_names"] for t in run.stream]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "GP-LoRA" in summary and "LoRA (no GP)" in summary and "| after task |" in summary
    for name in ("accuracy_matrix.png", "task_accuracy.png"):
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "adapter_gp" / "gp_memory.safetensors").is_file()
    assert (tmp_path / "run" / "adapter_baseline" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapter_baseline" / "gp_memory.safetensors").exists()
    assert peft_gp.get_memory(gp.model).tasks_seen == 3


def id_stream() -> tuple[list, BertForSequenceClassification]:
    """Two tasks of 2 classes given as input_ids (each class its own 4 tokens), and a tiny BERT for them."""
    generator = torch.Generator().manual_seed(0)

    def split(count):
        rows = {"input_ids": [], "attention_mask": [], "label": []}
        for label in range(4):
            for _ in range(count):
                ids = (4 + 4 * label + torch.randint(0, 4, (6,), generator=generator)).tolist()
                rows["input_ids"].append(ids)
                rows["attention_mask"].append([1] * 6)
                rows["label"].append(label)
        return Dataset.from_dict(rows)

    tasks = class_incremental_split(DatasetDict(train=split(6), test=split(3)), classes_per_task=[2, 2])
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=24, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=8, num_labels=4)
    )  # fmt: skip
    return tasks, model


def test_in_memory_task_incremental_run_with_a_model_object(tmp_path):
    """A tokenizer-free stream (input_ids directly) and a model built from a config, with task-id evaluation."""
    tasks, model = id_stream()
    config = RunConfig(name="mem", scenario="task", epochs=4, batch_size=4, learning_rate=5e-2, plots=False,
                       progress=False, output_dir=str(tmp_path / "out"), gp_memory_samples=8)  # fmt: skip
    # the task id masks the loss to the task's classes: old rows of the head get no gradient, so it trains freely
    assert peft_config_for(config, tasks, model, gp=True).gp_modules_to_save == "train"
    assert RunConfig(name="c", scenario="class", head_masking="current").modules_to_save_policy == "project"
    run = run_sequence(config, tasks=tasks, model=model, **SILENT)
    check_matrix(run.accuracy_matrix, 2)
    assert run.metrics == pytest.approx(accuracy_matrix_summary(run.accuracy_matrix))
    assert config.masking == "current"
    assert run.accuracy_matrix[1][0] == run.accuracy_matrix[0][0]  # task 1 kept exactly with the head unprojected
    assert not (tmp_path / "out" / "accuracy_matrix.png").exists() and (tmp_path / "out" / "summary.md").is_file()


def test_bad_input_fails_before_training(tiny_dirs, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("peft_gp.continual.runner.train_stream", no_training)
    cases = [
        (dict(classes=["apple", "brid"], classes_per_task=[1, 1]), "unknown class 'brid'. Did you mean 'bird'"),
        (dict(label_column="topic"), "no label column 'topic'"),
        (dict(dataset=str(tmp_path / "missing")), "Cannot load dataset"),
        (dict(model=str(tmp_path / "nomodel")), "Cannot load the tokenizer"),
        (dict(paradigm="lorra"), "Unknown paradigm 'lorra'. Did you mean 'lora'"),
        (dict(scenario="domain"), "needs a list of datasets"),
        (dict(paradigm_kwargs={"target_modules": ["q_proj"]}), r"Set paradigm_kwargs.target_modules .*'query'"),
        (dict(paradigm_kwargs={"rank": 4}), "paradigm_kwargs do not fit the 'lora' config"),
    ]
    for changes, message in cases:
        with pytest.raises(RunConfigError, match=message):
            run_sequence(tiny_run_config(tiny_dirs, tmp_path, **changes), **SILENT)
    headless = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(RunConfigError, match="BertModel has no classification head"):
        run_sequence(tiny_run_config(tiny_dirs, tmp_path), model=headless, **SILENT)
    assert not (tmp_path / "run").exists()


def test_runs_with_task_slices_give_each_task_the_baseline_s_rank(tmp_path):
    """``gp_task_slices`` in a run: the GP adapter gets one slice of the baseline's rank per task (``lora_alpha / r``
    kept), the plain baseline stays as it is, and both run; a wrong value or paradigm is refused before training."""
    tasks, model = id_stream()
    config = RunConfig(name="slices", scenario="task", epochs=2, batch_size=4, learning_rate=5e-2, plots=False,
                       progress=False, output_dir=str(tmp_path / "out"), gp_memory_samples=8, gp_task_slices=2,
                       gp_importance_scale=10.0, compare_baseline=True, paradigm_kwargs={"r": 4})  # fmt: skip
    gp_config = peft_config_for(config, tasks, model, gp=True)
    assert (gp_config.r, gp_config.lora_alpha, gp_config.gp_task_slices) == (8, 32, 2)
    assert gp_config.gp_importance_scale == 10.0
    plain = peft_config_for(config, tasks, model, gp=False)
    assert (type(plain).__name__, plain.r, plain.lora_alpha) == ("LoraConfig", 4, 16)
    run = run_sequence(config, tasks=tasks, model=model, **SILENT)
    check_matrix(run.accuracy_matrix, 2)
    check_matrix(run.baseline.accuracy_matrix, 2)
    for bad, match in ((0, "positive integer"), (True, "positive integer"), (2.5, "positive integer")):
        with pytest.raises(RunConfigError, match=f"gp_task_slices must be a {match}"):
            RunConfig(gp_task_slices=bad)
    with pytest.raises(RunConfigError, match="LoRA and adapter option; paradigm is 'prompt'"):
        RunConfig(paradigm="prompt", gp_task_slices=2)



def test_gp_kwargs_reach_the_gp_config_only_and_bad_ones_are_refused():
    tasks, model = id_stream()
    config = RunConfig(name="kwargs", scenario="task", gp_kwargs={"gp_max_basis_rank": 3, "gp_update_budget_gb": 1.0})
    gp_config = peft_config_for(config, tasks, model, gp=True)
    assert (gp_config.gp_max_basis_rank, gp_config.gp_update_budget_gb) == (3, 1.0)
    assert type(peft_config_for(config, tasks, model, gp=False)).__name__ == "LoraConfig"
    assert RunConfig.from_dict(config.to_dict()).gp_kwargs == config.gp_kwargs
    with pytest.raises(RunConfigError, match="'gp_max_basis_rnk' in gp_kwargs. Did you mean 'gp_max_basis_rank'"):
        RunConfig(gp_kwargs={"gp_max_basis_rnk": 3})
    with pytest.raises(RunConfigError, match="gp_kwargs sets 'gp_threshold': set gp_threshold: ... as a field"):
        RunConfig(gp_threshold=0.9, gp_kwargs={"gp_threshold": 0.5})  # would have overridden the field silently
    with pytest.raises(RunConfigError, match="gp_kwargs must be a mapping"):
        RunConfig(gp_kwargs=[1])
    assert RunConfig(gp_kwargs=None).gp_kwargs == {}  # an empty YAML value
    with pytest.raises(RunConfigError, match="gp_max_basis_rank must be a positive integer"):
        RunConfig(gp_kwargs={"gp_max_basis_rank": 0})


def test_a_statistics_main_head_keeps_the_up_projections_whole_unless_told_otherwise():
    tasks, model = id_stream()

    def pattern(**fields):
        return peft_config_for(RunConfig(name="up", **fields), tasks, model, gp=True).gp_threshold_pattern

    assert pattern(heads=["lda", "trained"]) == {"lora_B": 1.0}
    assert pattern(heads=["ncm"], paradigm="adapter") == {"gp_adapter_up": 1.0}
    assert pattern(heads=["trained", "lda"]) is None  # the trained head is the result: its plasticity comes first
    assert pattern(heads=["lda"], paradigm="prompt") is None  # no up-projection
    assert pattern(heads=["lda"], gp_task_slices=2) is None  # not measured with slices
    assert pattern(heads=["lda"], gp_kwargs={"gp_threshold_pattern": {"query": 0.99}}) == {"query": 0.99}
    assert pattern(heads=["lda"], gp_kwargs={"gp_threshold_pattern": {}}) == {}  # the way out


VIT_KWARGS = {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "prompt": {"num_virtual_tokens": 4},
              "prefix": {"num_virtual_tokens": 4}}  # fmt: skip


@pytest.mark.parametrize("paradigm", sorted(VIT_KWARGS))
def test_image_stream_with_a_vit_built_from_its_config(paradigm, tmp_path):
    """The vision path: an image column scaled to pixel_values, a ViT from model_config, head in modules_to_save;
    prompt and prefix tuning too (they need a task type, and the prompt baseline peft_gp's vision route)."""
    generator = torch.Generator().manual_seed(0)
    images, labels = [], []
    for label in range(4):
        for _ in range(6):
            image = torch.zeros(8, 8)
            image[2 * label : 2 * label + 2] = 255  # class = which band of rows is bright
            images.append((image + 20 * torch.rand(8, 8, generator=generator)).clamp(0, 255).to(torch.uint8).tolist())
            labels.append(label)
    data = Dataset.from_dict({"image": images, "label": labels})
    config = RunConfig(
        name="vit", model=None, dataset="unused", n_tasks=2, classes_per_task=None, train_per_class=None,
        test_per_class=None, epochs=3, batch_size=4, learning_rate=2e-2, plots=False, progress=False,
        model_config={"model_type": "vit", "image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        paradigm=paradigm, paradigm_kwargs=VIT_KWARGS[paradigm], gp_memory_samples=8, compare_baseline=True,
        output_dir=str(tmp_path / "vit"),
    )  # fmt: skip
    tasks = class_incremental_split(data, n_tasks=2, seed=0, test_size=0.34)
    run = run_sequence(config, tasks=tasks, **SILENT)
    check_matrix(run.accuracy_matrix, 2)
    check_matrix(run.baseline.accuracy_matrix, 2)
    assert run.main.tasks[1]["gp_groups"] > 0  # the PEFT parameters and the classifier head are protected


PARADIGM_KWARGS = {"adapter": {"bottleneck_size": 8}, "prefix": {"num_virtual_tokens": 4},
                   "prompt": {"num_virtual_tokens": 4}}  # fmt: skip


@pytest.mark.parametrize("paradigm", sorted(set(PARADIGMS) - {"lora"}))
def test_every_other_registered_paradigm_runs(paradigm, tiny_dirs, tmp_path):
    config = tiny_run_config(tiny_dirs, tmp_path, paradigm=paradigm, paradigm_kwargs=PARADIGM_KWARGS.get(paradigm, {}),
                         compare_baseline=True, classes_per_task=[3, 3], epochs=6, plots=False)  # fmt: skip
    run = run_sequence(config, **SILENT)
    for result in run.results.values():
        check_matrix(result.accuracy_matrix, 2)
        assert result.accuracy_matrix[0][0] > 0.5  # the first task is learned
    assert peft_gp.get_memory(run.results["gp"].model).tasks_seen == 2
    assert run.info["same_initial_weights"] is True


def test_paradigm_registry_is_a_mapping_of_factories():
    assert "lora" in PARADIGMS
    config = PARADIGMS["lora"]({"r": 4}, {"gp_threshold": 0.9}, "SEQ_CLS")
    assert type(config).__name__ == "GPLoraConfig" and config.gp_threshold == 0.9 and config.r == 4
    assert type(PARADIGMS["lora"]({"r": 4}, None, "SEQ_CLS")).__name__ == "LoraConfig"


def test_model_without_the_requested_head_is_named():
    config = RunConfig(model_config={"model_type": "clip"})
    with pytest.raises(RunConfigError, match="has no sequence-classification head"):
        load_model(config, 3, image=False)


def test_collate_batch_cuts_only_trailing_padding_and_keeps_logits():
    from peft_gp.continual.evaluation import collate_batch

    rows = [
        {"input_ids": [5, 6, 7, 0, 0, 0], "attention_mask": [1, 1, 1, 0, 0, 0], "labels": 1, "length": 3},
        {"input_ids": [5, 6, 0, 0, 0, 0], "attention_mask": [1, 1, 0, 0, 0, 0], "labels": 0, "length": 2},
    ]
    batch = collate_batch(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # "length" (and any other column) dropped
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    left = [{"input_ids": [0, 0, 5], "attention_mask": [0, 0, 1], "labels": 0}]
    assert collate_batch(left)["input_ids"].shape == (1, 3)  # left padding is kept: positions must not move
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=8, num_labels=2)
    ).eval()  # fmt: skip
    full = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        cut = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(cut, model(**full).logits, atol=1e-5)


def test_length_grouped_sampler_is_a_permutation_of_similar_length_batches():
    from peft_gp.continual.stream import LengthGroupedSampler

    lengths = [int(x) for x in torch.randint(1, 65, (200,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=10, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(200)) and first != second  # every example once, a new order each epoch
    batches = [first[k : k + 10] for k in range(0, 200, 10)]
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    random_spread = [max(lengths[k : k + 10]) - min(lengths[k : k + 10]) for k in range(0, 200, 10)]
    assert sum(spread) < 0.5 * sum(random_spread)


def test_grouped_run_still_keeps_old_tasks(tiny_dirs, tmp_path):
    config = tiny_run_config(tiny_dirs, tmp_path, group_by_length=True, plots=False, compare_baseline=True)
    run = run_sequence(config, **SILENT)
    gp, plain = run.results["gp"], run.baseline
    check_matrix(gp.accuracy_matrix, 3)
    assert gp.metrics["forgetting"] <= plain.metrics["forgetting"]
    assert [t["train_examples"] for t in gp.tasks] == [t["train_examples"] for t in plain.tasks]

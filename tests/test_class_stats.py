"""Class statistics of the head's input and the heads built from them (issue 22): exact sums, exact merges of a class
seen again, heads that predict as their definitions say, files that round-trip bit for bit."""

from __future__ import annotations

import pytest
import torch

import peft_gp
from peft_gp.core.class_heads import aligned_head, lda_head, ncm_head, shrunk
from peft_gp.wiring.class_stats import GP_CLASS_STATS_NAME, ClassStatistics
from peft_gp.wiring.memory_file import GPMemoryError

from .testing import tiny_bert, train_steps


def gaussian_classes(seed: int = 0, per_class: int = 50, dim: int = 6, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=generator, dtype=torch.float64) * 3
    features = torch.cat([means[c] + torch.randn(per_class, dim, generator=generator, dtype=torch.float64)
                          for c in range(classes)])  # fmt: skip
    labels = [c for c in range(classes) for _ in range(per_class)]
    return features, labels, means


def test_statistics_are_the_exact_means_and_pooled_covariance():
    features, labels, _ = gaussian_classes()
    stats = ClassStatistics(dim=6)
    for start in range(0, len(labels), 17):  # streamed in uneven batches
        stats.add(features[start : start + 17], labels[start : start + 17])
    labels_tensor = torch.tensor(labels)
    means = torch.stack([features[labels_tensor == c].mean(0) for c in range(3)])
    torch.testing.assert_close(stats.means, means)
    centred = features - means[labels_tensor]
    torch.testing.assert_close(stats.covariance(), centred.T @ centred / (len(labels) - 3))


def test_a_class_seen_again_merges_exactly():
    features, labels, _ = gaussian_classes()
    whole = ClassStatistics(dim=6)
    whole.add(features, labels)
    first, second = ClassStatistics(dim=6), ClassStatistics(dim=6)
    first.add(features[:80], labels[:80])  # classes 0 and 1 (part)
    second.add(features[80:], labels[80:])  # class 1 again, and class 2
    first.merge(second)
    assert first.labels == [0, 1, 2]
    torch.testing.assert_close(first.counts, whole.counts)
    torch.testing.assert_close(first.sums, whole.sums)
    torch.testing.assert_close(first.covariance(), whole.covariance())


def test_heads_predict_as_defined():
    features, labels, _ = gaussian_classes(per_class=200)
    stats = ClassStatistics(dim=6)
    stats.add(features, labels)
    means, covariance = stats.means, stats.covariance()
    weight, bias = ncm_head(means)
    cosine = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
    assert torch.equal((features @ weight.T + bias).argmax(1), cosine.argmax(1))
    weight, bias = lda_head(means, covariance, shrinkage=0.0)
    inverse = torch.linalg.inv(covariance)
    direct = features @ inverse @ means.T - 0.5 * torch.einsum("cd,de,ce->c", means, inverse, means)
    torch.testing.assert_close(features @ weight.T + bias, direct)
    accuracy = ((features @ weight.T + bias).argmax(1) == torch.tensor(labels)).double().mean()
    assert accuracy > 0.9  # well-separated Gaussians
    start = torch.zeros(3, 6), torch.zeros(3)
    weight, bias = aligned_head(means, covariance, *start, steps=100, lr=0.05)
    aligned = ((features.float() @ weight.T + bias).argmax(1) == torch.tensor(labels)).double().mean()
    assert aligned > 0.9
    assert torch.linalg.cond(shrunk(torch.zeros(6, 6).double() + torch.eye(6).double() * 1e-12, 0.1)) < 1.01


def test_the_file_round_trips_bit_for_bit_and_bad_files_name_themselves(tmp_path):
    features, labels, _ = gaussian_classes()
    stats = ClassStatistics(dim=6, tasks_seen=2)
    stats.add(features, [f"class-{label}" for label in labels])
    path = str(tmp_path / GP_CLASS_STATS_NAME)
    stats.save(path)
    loaded = ClassStatistics.load(path)
    assert loaded.labels == stats.labels and loaded.tasks_seen == 2
    for name in ("counts", "sums", "second"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name))
    (tmp_path / GP_CLASS_STATS_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(GPMemoryError, match=GP_CLASS_STATS_NAME):
        ClassStatistics.load(path)


def test_statistics_head_needs_statistics():
    model = peft_gp.get_peft_model(tiny_bert(), peft_gp.GPLoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    train_steps(model, {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([0])}, 1)
    with pytest.raises(ValueError, match="gp_class_statistics=True"):
        peft_gp.statistics_head(model, "lda")


def test_trainer_keeps_statistics_valid_round_trips_and_pushes_them(tmp_path):
    """Two class-incremental tasks through GPTrainer with the LDA head: the statistics of task 1 stay those of its
    examples' current features (GP keeps them), the head predicts with LDA, and the file round-trips and is pushed."""
    from peft_gp.hub import MANIFEST_NAME, save_task
    from peft_gp.wiring.class_stats import ClassStatistics, StatisticsObserver
    from peft_gp.wiring.grams import collect_grams
    from peft_gp.wiring.state import get_state

    from .testing import gp_model, logits_on, task_dataset, training_args

    model = gp_model(gp_threshold=1.0, gp_class_statistics=True)
    for task_id in (0, 1):
        trainer = peft_gp.GPTrainer(
            model=model, args=training_args(tmp_path), train_dataset=task_dataset(task_id, 8), gp_statistics_head="lda"
        )
        trainer.train()
    stats = get_state(model).class_stats
    assert sorted(stats.labels) == [0, 1, 2, 3] and stats.tasks_seen == 2 and float(stats.counts.sum()) == 16
    # task 1's class means, recomputed from its examples now, are the stored ones: GP kept its features
    fresh = ClassStatistics(dim=stats.dim)
    loader = [{k: torch.tensor(task_dataset(0, 8)[k]) for k in ("input_ids", "attention_mask", "labels")}]
    collect_grams(model, get_state(model).groups, loader, observers=[StatisticsObserver(model, fresh)])
    for label in (0, 1):
        now, stored = fresh.means[fresh.labels.index(label)], stats.means[stats.labels.index(label)]
        torch.testing.assert_close(now, stored, rtol=1e-4, atol=1e-5)
    labels, weight, bias = peft_gp.statistics_head(model, "lda")
    head = model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(head.weight[labels], weight.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.bias[labels], bias.float(), rtol=1e-5, atol=1e-6)

    peft_gp.save_pretrained(model, tmp_path / "saved")
    assert (tmp_path / "saved" / GP_CLASS_STATS_NAME).is_file()
    loaded = peft_gp.from_pretrained(tiny_bert(), str(tmp_path / "saved"))
    restored = get_state(loaded).class_stats
    assert restored.labels == stats.labels and torch.equal(restored.second, stats.second)
    torch.testing.assert_close(logits_on(loaded, task_dataset(0, 8)), logits_on(model, task_dataset(0, 8)))
    save_task(model, str(tmp_path / "push"), task_name="second")
    assert GP_CLASS_STATS_NAME in (tmp_path / "push" / MANIFEST_NAME).read_text()


def test_class_statistics_without_a_linear_head_are_refused_before_training(tmp_path):
    """RoBERTa's classifier is an MLP: with gp_class_statistics, GPTrainer (and GPCallback when training begins)
    refuses it before any step, rather than after the task when the statistics are taken."""
    import transformers
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from .testing import task_dataset, training_args

    model = RobertaForSequenceClassification(
        RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=16, num_labels=4, pad_token_id=1)
    )  # fmt: skip
    config = peft_gp.GPLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"], gp_class_statistics=True)
    model = peft_gp.get_peft_model(model, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="no linear classification head"):
        peft_gp.GPTrainer(model=model, args=training_args(tmp_path), train_dataset=task_dataset(0, 4)).train()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=task_dataset(0, 4),
                                   callbacks=[peft_gp.GPCallback()])  # fmt: skip
    with pytest.raises(ValueError, match="no linear classification head"):
        trainer.train()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)


def test_the_next_task_trains_from_the_trained_head_not_the_statistics_head(tmp_path):
    """The statistics head is written for inference after each task; the next task trains from the head as it was
    trained (an LDA head's large logits made task 2's first loss ~400). Same losses as without a statistics head."""
    from .testing import gp_model, task_dataset, training_args

    losses = {}
    for head in (None, "lda"):
        torch.manual_seed(0)
        model = gp_model(gp_threshold=1.0, gp_class_statistics=True)
        for task_id in (0, 1):
            trainer = peft_gp.GPTrainer(
                model=model,
                args=training_args(tmp_path, num_train_epochs=2),
                train_dataset=task_dataset(task_id, 8),
                gp_statistics_head=head,
            )
            trainer.train()
        losses[head] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses["lda"] == pytest.approx(losses[None], rel=1e-4, abs=1e-5)
    assert max(losses["lda"]) < 10


def test_a_head_without_bias_is_refused_before_training_and_before_anything_is_written(tmp_path):
    """LDA needs a bias (Llama's score layer has none): GPTrainer refuses before training; apply_statistics_head
    refuses before it writes a row (the head used to be half overwritten when the error came)."""
    from .testing import task_dataset, training_args

    base = tiny_bert()
    base.classifier = torch.nn.Linear(base.classifier.in_features, base.classifier.out_features, bias=False)
    config = peft_gp.GPLoraConfig(task_type="SEQ_CLS", target_modules=["query"], gp_class_statistics=True)
    model = peft_gp.get_peft_model(base, config)
    with pytest.raises(ValueError, match="needs a head with a bias.*statistics_head='ncm'"):
        peft_gp.GPTrainer(model=model, args=training_args(tmp_path), train_dataset=task_dataset(0, 8),
                          gp_statistics_head="lda")  # fmt: skip
    peft_gp.GPTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=task_dataset(0, 8),
                      gp_statistics_head="ncm").train()  # fmt: skip
    head = model.base_model.model.classifier.modules_to_save["default"]
    before = head.weight.detach().clone()
    with pytest.raises(ValueError, match="needs a bias"):
        peft_gp.apply_statistics_head(model, "lda")
    assert torch.equal(head.weight, before)


def test_the_head_as_trained_is_saved_with_the_statistics_and_put_back_after_loading(tmp_path):
    """Save after a task with the LDA head written, load with peft_gp.from_pretrained, train the next task: it
    starts from the head as trained (saved in gp_class_stats.safetensors), not from the LDA head (loss ~360)."""
    from peft_gp.wiring.class_stats import head_module
    from peft_gp.wiring.state import get_state

    from .testing import gp_model, task_dataset, training_args

    torch.manual_seed(0)
    model = gp_model(gp_threshold=1.0, gp_class_statistics=True)
    peft_gp.GPTrainer(model=model, args=training_args(tmp_path, num_train_epochs=2), train_dataset=task_dataset(0, 8),
                      gp_statistics_head="lda").train()  # fmt: skip
    trained_weight, trained_bias = get_state(model).class_stats.trained_head
    assert not torch.equal(head_module(model).weight.detach().cpu(), trained_weight)  # the LDA rows are written
    peft_gp.save_pretrained(model, tmp_path / "saved")
    loaded = peft_gp.from_pretrained(tiny_bert(), str(tmp_path / "saved"), is_trainable=True)
    assert torch.equal(get_state(loaded).class_stats.trained_head[0], trained_weight)
    trainer = peft_gp.GPTrainer(model=loaded, args=training_args(tmp_path, num_train_epochs=1),
                                train_dataset=task_dataset(1, 8), gp_statistics_head="lda")  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert max(losses) < 10, losses
    assert get_state(loaded).class_stats.trained_head is not None  # task 2's head as trained, kept for task 3

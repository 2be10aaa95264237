"""Bad input gets a clear error naming the problem and the fix, and nothing is half-written."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peft_gp
from peft_gp import GP_MEMORY_NAME, GPLoraConfig, GPMemoryError
from peft_gp.continual import RunConfig, RunConfigError
from peft_gp.hub import GPHubError
from peft_gp.wiring.memory import GPMemory
from peft_gp.wiring.state import get_state

from .testing import tiny_bert, tiny_gpt2


def bert_model(**overrides):
    settings = {"task_type": "SEQ_CLS", "r": 8, "target_modules": ["query", "value"], **overrides}
    return get_peft_model(tiny_bert(), GPLoraConfig(**settings))


def batch(task_id: int = 0):
    ids = torch.randint(4, 12, (2, 4), generator=torch.Generator().manual_seed(task_id))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}


def saved_model(path, **overrides):
    model = bert_model(**overrides)
    peft_gp.update_memory(model, [batch()])
    peft_gp.save_pretrained(model, path)
    return model


def test_target_modules_not_found():
    with pytest.raises(ValueError, match="target_modules|Target modules"):
        bert_model(target_modules=["not_a_layer"])


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_threshold_out_of_range(threshold):
    with pytest.raises(ValueError, match=r"gp_threshold must be in \(0, 1\]"):
        GPLoraConfig(gp_threshold=threshold)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("gp_projection", "both", "gp_projection must be one of"),
        ("gp_memory_samples", 0, "gp_memory_samples must be at least 1"),
        ("gp_threshold_increment", -0.1, "gp_threshold_increment must be in"),
        ("gp_modules_to_save", "keep", "gp_modules_to_save must be one of"),
    ],
)
def test_other_config_values_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPLoraConfig(**{field: value})


def test_memory_of_another_rank_does_not_fit(tmp_path):
    saved_model(tmp_path, r=8)
    other = bert_model(r=4)
    with pytest.raises(GPMemoryError, match="dimension mismatches.*lora_B.*memory 8, model 4"):
        peft_gp.load_memory(other, str(tmp_path))
    assert peft_gp.get_memory(other).tasks_seen == 0  # nothing attached


def test_memory_of_another_adapter_does_not_fit(tmp_path):
    saved_model(tmp_path, target_modules=["query"])
    with pytest.raises(GPMemoryError, match="layers the model has but the memory lacks"):
        peft_gp.load_memory(bert_model(target_modules=["query", "value"]), str(tmp_path))


def test_memory_of_another_base_model_does_not_fit(tmp_path):
    saved_model(tmp_path)
    gpt2 = get_peft_model(
        tiny_gpt2(), GPLoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], r=8, fan_in_fan_out=True)
    )
    with pytest.raises(GPMemoryError, match="'bert' model, but this base model is 'gpt2'"):
        peft_gp.load_memory(gpt2, str(tmp_path))


def test_empty_dataset_for_the_memory():
    model = bert_model()
    with pytest.raises(GPMemoryError, match="no examples"):
        peft_gp.update_memory(model, [])
    assert peft_gp.get_memory(model).tasks_seen == 0


def test_nan_features_are_refused_and_nothing_is_stored():
    model = bert_model()
    peft_gp.update_memory(model, [batch()])
    stored = {name: basis.clone() for name, basis in peft_gp.get_memory(model).bases.items()}
    with torch.no_grad():
        model.base_model.model.bert.embeddings.word_embeddings.weight.fill_(float("nan"))
    with pytest.raises(GPMemoryError, match="NaN or inf features reached"):
        peft_gp.update_memory(model, [batch()])
    memory = peft_gp.get_memory(model)
    assert memory.tasks_seen == 1
    assert all(torch.equal(memory.bases[name], basis) for name, basis in stored.items())


def test_missing_memory_file(tmp_path):
    saved_model(tmp_path)
    os.remove(tmp_path / GP_MEMORY_NAME)
    with pytest.raises(GPMemoryError, match="No gp_memory.safetensors in"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path), is_trainable=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_memory_file(tmp_path, damage):
    saved_model(tmp_path)
    path = tmp_path / GP_MEMORY_NAME
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    with pytest.raises(GPMemoryError, match="restore it from an earlier checkpoint"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))


def test_newer_format_version_is_refused(tmp_path, monkeypatch):
    model = saved_model(tmp_path)
    memory = peft_gp.get_memory(model)
    monkeypatch.setattr("peft_gp.wiring.memory.FORMAT_VERSION", 99)
    memory.save(str(tmp_path / GP_MEMORY_NAME))
    monkeypatch.undo()
    with pytest.raises(GPMemoryError, match="newer than this peft_gp reads"):
        GPMemory.load(str(tmp_path / GP_MEMORY_NAME))


def test_plain_lora_adapter_is_not_taken_for_a_gp_one(tmp_path):
    plain = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    plain.save_pretrained(tmp_path)
    assert not (tmp_path / GP_MEMORY_NAME).exists()
    with pytest.raises(ValueError, match="not saved by peft_gp"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))


def test_memory_write_is_atomic(tmp_path, monkeypatch):
    model = saved_model(tmp_path)
    path = tmp_path / GP_MEMORY_NAME
    original = path.read_bytes()
    peft_gp.update_memory(model, [batch(1)])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        peft_gp.save_memory(model, str(tmp_path))
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []


def test_unsupported_lora_targets_are_named():
    from peft.tuners.lora.variants import ArrowLinearVariant

    model = get_peft_model(tiny_bert(), GPLoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_variant["default"] = ArrowLinearVariant()
    with pytest.raises(ValueError, match=r"ArrowLinearVariant on 'bert.encoder.layer.0.attention.self.query'.*Fix"):
        peft_gp.get_memory(model)


def test_non_linear_module_to_save_is_kept_fixed_and_named():
    config = GPLoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["LayerNorm"])
    with pytest.warns(UserWarning, match=r"\(LayerNorm\), which cannot be projected.*gp_modules_to_save='freeze'"):
        state = get_state(get_peft_model(tiny_bert(), config))
    fixed = [group for group in state.groups if "LayerNorm" in group.name]
    assert fixed and all(group.frozen for group in fixed)


def test_wrong_dtype_in_memory_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = saved_model(tmp_path)
    memory = peft_gp.get_memory(model)
    tensors = {name: basis.double() for name, basis in memory.state_dict().items()}
    save_file(tensors, str(tmp_path / GP_MEMORY_NAME), metadata=memory.metadata())
    with pytest.raises(GPMemoryError, match="dtype torch.float64, expected torch.float32"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_tasks", "abc", "n_tasks must be a whole number"),
        ("n_tasks", float("inf"), "n_tasks must be a whole number"),
        ("test_size", "abc", r"test_size must be a number in \(0, 1\)"),
        ("model_config", "model_type=vit", "model_config must be a mapping"),
        ("gp_threshold", None, r"gp_threshold is null: give it a value \(default 0.97\)"),
        ("gp_projection", None, "gp_projection is null"),
        ("seed", "x", "seed must be an integer"),
        ("weight_decay", -1.0, "weight_decay must be a number of at least 0"),
        ("epochs", float("nan"), "epochs must be a positive number"),
    ],
)
def test_a_run_config_refuses_wrong_types_with_the_field_named(field, value, message):
    with pytest.raises(RunConfigError, match=message):
        RunConfig(**{field: value})


def test_null_means_a_default_only_where_it_says_so():
    config = RunConfig(paradigm_kwargs=None, gp_kwargs=None, gp_modules_to_save=None, gp_importance_scale=None)
    assert config.paradigm_kwargs == {} and config.gp_kwargs == {} and config.modules_to_save_policy == "project"


@pytest.mark.parametrize("wrong", ["one batch", "a tensor", "a list of tensors"])
def test_update_memory_names_what_it_takes_when_given_something_else(wrong):
    model = bert_model()
    given = {"one batch": batch(), "a tensor": batch()["input_ids"], "a list of tensors": [batch()["input_ids"]]}
    with pytest.raises(ValueError, match=r"iterable of batches, each a dict of tensors .* or \[batch\]"):
        peft_gp.update_memory(model, given[wrong])
    assert get_state(model, "default").memory.tasks_seen == 0


@pytest.mark.parametrize("where", ["absolute", "relative", "a Path", "home", "hub-like"])
def test_from_pretrained_on_a_missing_folder_says_there_is_none(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    model_id = {"absolute": str(tmp_path / "nope"), "relative": "./nope", "a Path": tmp_path / "nope",
                "home": "~/nope", "hub-like": "gp-run/finall"}[where]  # fmt: skip
    error, message = (GPHubError, "there is no local folder") if where == "hub-like" else (FileNotFoundError, "is not")
    with pytest.raises(error, match=message):
        peft_gp.from_pretrained(tiny_bert(), model_id)


def test_from_pretrained_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    saved_model(str(tmp_path / "run"))
    loaded = peft_gp.from_pretrained(tiny_bert(), "~/run")
    assert peft_gp.get_memory(loaded).tasks_seen == 1


def test_numpy_numbers_and_whole_floats_are_taken_as_python_numbers():
    np = pytest.importorskip("numpy")
    config = RunConfig(seed=np.int64(3), n_tasks=3.0, batch_size=np.int32(8), test_size=np.float32(0.25), epochs=2)
    assert (config.seed, config.n_tasks, config.batch_size, config.test_size, config.epochs) == (3, 3, 8, 0.25, 2.0)
    assert all(type(value) is int for value in (config.seed, config.n_tasks, config.batch_size))
    with pytest.raises(RunConfigError, match="batch_size must be a positive integer, got 2.5"):
        RunConfig(batch_size=2.5)

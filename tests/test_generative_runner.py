"""The generative scenario (``scenario: generative``) on a tiny random Llama and a word-level tokenizer: encoding,
batched greedy generation, the whole run with GP, the reference memory and the plain baseline, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import peft_gp
from peft_gp.continual import RunConfig, RunConfigError, run_sequence
from peft_gp.continual.generative import PadCollator, encode_pairs, evaluate_generative, generate_answers, normalise
from peft_gp.continual.generative_data import general_text, split_by_answer
from peft_gp.continual.tasks import Task

ANSWERS = {"colour": {"red": "apple", "blue": "bird"}, "shape": {"round": "car", "flat": "dune"}}
TEMPLATES = {"colour": "Text: {text}\nColour:", "shape": "Text: {text}\nShape:"}
GENERAL = ["echo", "fern"]


def vocabulary() -> list[str]:
    words = ["[PAD]", "[UNK]", "[EOS]", "Text:", "Colour:", "Shape:"]
    words += [a for answers in ANSWERS.values() for a in answers]
    stems = [s for answers in ANSWERS.values() for s in answers.values()] + GENERAL
    return words + [f"{stem}{j}" for stem in stems for j in range(4)]


TINY_LLAMA = {"model_type": "llama", "vocab_size": len(vocabulary()), "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "initializer_range": 0.02, "pad_token_id": 0, "eos_token_id": 2,
              "bos_token_id": 2}  # fmt: skip


def save_tokenizer(folder: Path) -> Path:
    """A whitespace word-level tokenizer over ``vocabulary()`` with ``[EOS]`` (id 2) and ``[PAD]`` (id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    return folder


def tiny_tasks(per_answer: int = 12, seed: int = 0) -> list[Task]:
    """Two tasks whose answer is told by the text's words (``apple*`` -> red, ``car*`` -> round, ...)."""
    rng = random.Random(seed)
    tasks = []
    for name, answers in ANSWERS.items():
        texts = {a: [" ".join(f"{stem}{rng.randrange(4)}" for _ in range(3)) + f" {i}" for i in range(per_answer)]
                 for a, stem in answers.items()}  # fmt: skip
        data = split_by_answer(texts, seed, test_size=0.25, train_per_answer=None, test_per_answer=None)
        tasks.append(Task(name=name, train=data["train"], test=data["test"], classes=[], class_names=list(answers),
                          info={"template": TEMPLATES[name]}))  # fmt: skip
    return tasks


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def general_file(folder: Path) -> Path:
    rng = random.Random(1)
    passages = [" ".join(f"{rng.choice(GENERAL)}{rng.randrange(4)}" for _ in range(6)) for _ in range(40)]
    path = folder / "general.txt"
    path.write_text("\n\n".join(passages) + "\n")
    return path


def test_encoding_masks_the_prompt_and_cuts_the_text_not_the_question(tokenizer):
    data = Dataset.from_dict({"text": ["apple0 apple1 apple2 apple3 apple0 apple1"], "answer": ["red"]})
    row = encode_pairs(data, tokenizer, TEMPLATES["colour"], max_length=7)[0]
    words = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert words == ["Text:", "apple0", "apple1", "apple2", "Colour:", "red", "[EOS]"]  # the text cut, not Colour:
    assert row["labels"] == [-100] * 5 + row["input_ids"][5:] and row["prompt_length"] == 5
    batch = PadCollator(tokenizer.pad_token_id)([row, {**row, "input_ids": row["input_ids"][:3],
                                                        "attention_mask": [1] * 3, "labels": [-100] * 3}])  # fmt: skip
    assert batch["labels"][1].tolist() == [-100] * 7 and batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(RunConfigError, match="max_length is too small"):
        encode_pairs(data, tokenizer, TEMPLATES["colour"], max_length=3)
    assert normalise("  Red \nmore") == "red"


def test_left_padded_batches_generate_what_single_prompts_generate(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    options = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(options.pop("model_type"), **options))
    task = tiny_tasks()[0]
    data = encode_pairs(task.test, tokenizer, TEMPLATES["colour"], max_length=16)
    data = data.select(range(4)).map(lambda row, i: {"prompt_length": row["prompt_length"] - (i % 2)},
                                     with_indices=True)  # fmt: skip  (prompts of two lengths: real left padding)
    batched = generate_answers(model, tokenizer, data, batch_size=4, max_new_tokens=3)
    single = [generate_answers(model, tokenizer, data.select([i]), max_new_tokens=3)[0] for i in range(4)]
    assert batched == single and any(batched)
    reading = evaluate_generative(model, tokenizer, data, batch_size=4)
    assert 0.0 <= reading["exact_match"] <= 1.0 and reading["answer_loss"] > 0


def run_config(tmp_path: Path, tokenizer_dir: Path, **changes) -> RunConfig:
    values = dict(name="tiny_generative", scenario="generative", model=str(tokenizer_dir), model_config=TINY_LLAMA,
                  dataset=["unused"], max_length=16, paradigm_kwargs={"target_modules": ["q_proj", "v_proj"]},
                  epochs=8, batch_size=6, eval_batch_size=8, learning_rate=3e-2, compare_baseline=True,
                  reference_memory=True, general_text=str(general_file(tmp_path)), general_text_samples=8,
                  gp_memory_samples=16, output_dir=str(tmp_path / "run"), progress=False, plots=False)  # fmt: skip
    return RunConfig(**{**values, **changes})


def test_generative_run_records_exact_match_loss_and_perplexity(tmp_path, tokenizer_dir):
    config = run_config(tmp_path, tokenizer_dir)
    run = run_sequence(config, tasks=tiny_tasks(), say=lambda *_: None)
    gp, plain = run.results["gp_reference"], run.results["baseline"]
    assert run.info["same_initial_weights"] is True
    for result in (gp, plain):
        assert [len(row) for row in result.accuracy_matrix] == [2, 2] and result.accuracy_matrix[0][1] is None
        assert result.metrics["forgetting"] == pytest.approx(
            max(result.accuracy_matrix[0][0] - result.accuracy_matrix[1][0], 0.0))
        before = run.info["base_model"]["perplexity"]
        assert len(result.perplexity) == 2 and result.metrics["perplexity_before"] == before
        assert result.metrics["perplexity_rise"] == pytest.approx(result.perplexity[-1] - before)
        assert all(loss > 0 for loss in result.loss_matrix[1])
    assert plain.accuracy_matrix[0][0] > run.info["base_model"]["exact_match"][0]  # the first task was learned
    assert gp.memory_file_bytes > 0 and plain.memory_file_bytes is None
    memory = peft_gp.get_memory(gp.model)
    assert memory.tasks_seen == 3  # "reference" (task 0), then both tasks
    saved = json.loads(Path(run.paths["result"]).read_text())
    assert saved["results"]["gp_reference"]["perplexity"] == gp.perplexity
    assert saved["stream"][0]["template"] == TEMPLATES["colour"]
    assert "## General-text perplexity" in Path(run.paths["summary"]).read_text()
    plain_only = run_sequence(config.replace(gp=False, compare_baseline=False, reference_memory=False,
                                             general_text=None, output_dir=str(tmp_path / "plain")),
                              tasks=tiny_tasks(), say=lambda *_: None)  # fmt: skip
    assert plain_only.main.perplexity == [] and plain_only.main.accuracy_matrix == plain.accuracy_matrix


def test_folder_tasks_take_a_prompt_or_text_column(tmp_path):
    from datasets import DatasetDict

    from peft_gp.continual.generative_data import load_generative_tasks

    for column in ("prompt", "text"):
        rows = {column: ["Say red:", "Say blue:"], "answer": ["red", "blue"]}
        DatasetDict(train=Dataset.from_dict(rows), test=Dataset.from_dict(rows)).save_to_disk(tmp_path / column)
    tasks = load_generative_tasks([str(tmp_path / "prompt"), str(tmp_path / "text")], 0, 0.2, None, None)
    assert [t.name for t in tasks] == ["prompt", "text"] and all(t.info["template"] == "{text}" for t in tasks)
    assert tasks[0].train["text"] == ["Say red:", "Say blue:"] and tasks[1].class_names == ["blue", "red"]
    Dataset.from_dict({"question": ["x"], "answer": ["y"]}).save_to_disk(tmp_path / "wrong")
    with pytest.raises(RunConfigError, match="lacks a 'prompt'"):
        load_generative_tasks([str(tmp_path / "wrong")], 0, 0.2, None, None)


def test_bad_generative_input_fails_before_training(tmp_path, tokenizer_dir):
    with pytest.raises(RunConfigError, match="classification datasets"):
        run_sequence(run_config(tmp_path, tokenizer_dir, dataset=["bbc_news"]))
    with pytest.raises(RunConfigError, match="Did you mean 'bbc_topic'"):
        run_sequence(run_config(tmp_path, tokenizer_dir, dataset=["bbc_topics", "fortune_file"]))
    with pytest.raises(RunConfigError, match="needs scenario 'generative'"):
        RunConfig(reference_memory=True)
    with pytest.raises(RunConfigError, match="general_text_samples"):
        RunConfig(scenario="generative", general_text_samples=0)
    with pytest.raises(RunConfigError, match="neither the built-in"):
        general_text(str(tmp_path / "missing.txt"))
    broken = tiny_tasks()
    broken[1].test = broken[1].test.remove_columns("answer")
    with pytest.raises(RunConfigError, match=r"Task 1 \(shape\) needs test examples"):
        run_sequence(run_config(tmp_path, tokenizer_dir), tasks=broken)
    with pytest.raises(RunConfigError, match="target_modules"):
        run_sequence(run_config(tmp_path, tokenizer_dir, paradigm_kwargs={"target_modules": ["nope"]}),
                     tasks=tiny_tasks())  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_cli_exposes_the_generative_fields(capsys):
    import yaml

    from peft_gp.cli import main

    assert main(["config", "--scenario", "generative", "--dataset", "bbc_topic,fortune_file", "--reference-memory",
                 "--general-text-samples", "64"]) == 0  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["reference_memory"] is True and printed["dataset"] == ["bbc_topic", "fortune_file"]
    assert printed["general_text"] == "fortunes_general" and printed["general_text_samples"] == 64
    with pytest.raises(SystemExit) as stop:
        main(["config", "--scenario", "generative", "--reference-memory", "--general-text", "null"])
    assert stop.value.code == 2 and "a general_text" in capsys.readouterr().err

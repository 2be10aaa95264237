"""Prompt and prefix tuning on Split Fashion-MNIST with a ViT: a stream where plain prompt and prefix tuning forget.

What it measures (issue 21)
    The vision stream of ``split_fashion_mnist_vit.py`` (a small ViT trained in full on 4 classes, then 3 tasks of 2
    classes), with prompt tuning (VPT-shallow: the prompt after the class token) or prefix tuning instead of LoRA, 10
    virtual tokens, the 10-way head trained beside them. Per paradigm and seed, from the same pretrained weights:
    plain (the paradigm's config with a ``transformers.Trainer``, no memory) and GP with ``gradient`` and ``update``
    projection (``GPTrainer``). Reported: task-incremental final average accuracy and forgetting, the accuracy on
    each task right after learning it (the diagonal), and class-incremental accuracy, as means over the seeds. Target:
    GP forgetting <= 40% of plain's at task-incremental accuracy >= plain's.

How to run (from the repository root; data: ``apt-get install -y dataset-fashion-mnist``)::

    .venv/bin/python benchmarks/prompt_prefix_vit.py                 # 3 seeds, both paradigms; ~15 min on 2 cores
    .venv/bin/python benchmarks/prompt_prefix_vit.py --quick --seeds 0   # seconds; the numbers mean nothing
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import begin, benchmark_record, default_output, environment, write_record

environment()

import argparse
import statistics
import time

import class_heads
import torch

from peft_gp.continual.stream import train_stream
from peft_gp.core.metrics import accuracy_matrix_summary

PARADIGMS = ("prompt", "prefix")
METHODS = ("plain", "gradient", "update")
LEARNING_RATES = {"prompt": 3e-2, "prefix": 3e-2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paradigms", default=",".join(PARADIGMS), help=f"comma-separated, of {PARADIGMS}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {LEARNING_RATES})")
    parser.add_argument("--gp-threshold", type=float, default=0.97, help="energy threshold tau of GP's memory")
    parser.add_argument("--quick", action="store_true", help="tiny streams and 1 epoch (what the tests run)")
    parser.add_argument("--data-dir", default=None, help="another folder of the four Fashion-MNIST IDX files")
    parser.add_argument("--output", default=None, help="JSON (default benchmarks/results/prompt_prefix_vit.json)")
    args = parser.parse_args(argv)
    args.paradigm_list = [p.strip() for p in args.paradigms.split(",") if p.strip()]
    if not args.paradigm_list or set(args.paradigm_list) - set(PARADIGMS):
        raise SystemExit(f"--paradigms takes some of {PARADIGMS}, got {args.paradigms!r}")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    default_output(args, "prompt_prefix_vit")
    return args


def run(args: argparse.Namespace, paradigm: str, seed: int) -> dict:
    """Plain, GP ``gradient`` and GP ``update`` from the same pretrained ViT; ``method -> record``."""
    setup = argparse.Namespace(**vars(args), model=None)
    setup.lr = args.lr if args.lr is not None else LEARNING_RATES[paradigm]
    config, tasks, base = class_heads.fashion_setup(setup, paradigm, seed)
    records = {}
    for method in METHODS:
        torch.manual_seed(seed)
        projection = "update" if method == "plain" else method
        run_config = config.replace(gp_projection=projection, heads=["trained"])
        result, _ = train_stream(base, tasks, run_config, gp=method != "plain", say=lambda *_: None)
        til = result.task_il_matrix
        records[method] = {"til_matrix": til, "cil_matrix": result.accuracy_matrix,
                           "til": accuracy_matrix_summary(til), "cil": accuracy_matrix_summary(result.accuracy_matrix),
                           "new_task_accuracy": statistics.fmean(til[t][t] for t in range(len(til))),
                           "seconds": round(result.seconds, 1)}  # fmt: skip
        print(f"  {paradigm} seed {seed} {method:8s} TIL acc {100 * records[method]['til']['average_accuracy']:.1f} "
              f"forgetting {100 * records[method]['til']['forgetting']:.1f} ({result.seconds:.0f}s)", flush=True)
    return records


def summarise(runs: dict) -> dict:
    """``paradigm -> method -> metric -> [mean, std]`` over the seeds (percent)."""
    metrics = {"til_acc": ("til", "average_accuracy"), "til_forgetting": ("til", "forgetting"),
               "new_task_acc": (None, "new_task_accuracy"), "cil_acc": ("cil", "average_accuracy")}  # fmt: skip
    summary: dict = {}
    for paradigm, per_seed in runs.items():
        for method in METHODS:
            cells = {"seeds": len(per_seed)}
            for key, (view, metric) in metrics.items():
                values = [100 * (r[method][view][metric] if view else r[method][metric]) for r in per_seed]
                cells[key] = [statistics.fmean(values), statistics.pstdev(values)]
            summary.setdefault(paradigm, {})[method] = cells
    return summary


def targets(summary: dict) -> list[dict]:
    """Issue 21: GP forgetting <= 40% of plain's, at task-incremental final average >= plain's."""
    rows = []
    for paradigm, methods in summary.items():
        plain = methods["plain"]
        for method in ("gradient", "update"):
            gp = methods[method]
            ratio = gp["til_forgetting"][0] / plain["til_forgetting"][0] if plain["til_forgetting"][0] > 0 else None
            met = ratio is not None and ratio <= 0.4 and gp["til_acc"][0] >= plain["til_acc"][0]
            rows.append({"paradigm": paradigm, "method": method, "forgetting_ratio": ratio,
                         "til_acc_gap": gp["til_acc"][0] - plain["til_acc"][0], "met": met})  # fmt: skip
    return rows


def table(summary: dict) -> str:
    lines = ["| paradigm | method | TIL acc | TIL forgetting | new-task acc | CIL acc | seeds |", "|---" * 7 + "|"]
    for paradigm, methods in summary.items():
        for method, c in methods.items():
            cells = " | ".join(f"{c[k][0]:.1f} ± {c[k][1]:.1f}" for k in ("til_acc", "til_forgetting", "new_task_acc",
                                                                         "cil_acc"))  # fmt: skip
            lines.append(f"| {paradigm} | {method} | {cells} | {c['seeds']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start, began = begin()
    runs = {p: [{"seed": s, **run(args, p, s)} for s in args.seed_list] for p in args.paradigm_list}
    summary = summarise(runs)
    print("\n" + table(summary))
    checks = targets(summary)
    print("\ntargets (issue 21, means over seeds): GP forgetting <= 40% of plain's at TIL accuracy >= plain's")
    for row in checks:
        ratio = "n/a (plain does not forget)" if row["forgetting_ratio"] is None else f"{row['forgetting_ratio']:.2f}"
        print(f"  {row['paradigm']:7s} {row['method']:8s} forgetting ratio {ratio}, TIL acc gap "
              f"{row['til_acc_gap']:+.1f}  {'met' if row['met'] else 'NOT met'}")
    record = benchmark_record("prompt_prefix_vit", load_start, time.perf_counter() - began, dict(vars(args)),
                              learning_rates=LEARNING_RATES, runs=runs, summary=summary, targets=checks)  # fmt: skip
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

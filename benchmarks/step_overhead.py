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

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import peft_gp  # noqa: E402
from peft_gp.continual.paradigms import build_peft_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    INPUT_KEYS,
    RESULTS,
    bbc_root,
    machine_record,
    minilm_path,
    now,
    quiet,
    read_article,
    write_record,
)

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


def paradigm_rows(base, task_batches, timed_batch, args) -> dict:
    """Adapter, prompt and prefix tuning on one batch: each GP model against its unprotected baseline, interleaved.

    PEFT has no bottleneck adapter, so the adapter baseline is ``GPAdapterConfig`` without a memory (the same tuner,
    no projection); the adapters sit beside each layer's feed-forward block (``--bottleneck`` wide).

    The prompt baseline is PEFT's ``PromptTuningConfig``. PEFT's own prefix tuning does not run on BERT-like encoders
    with transformers 5 (it passes the renamed cache argument), so the prefix baseline is ``GPPrefixTuningConfig``
    without a memory: the same forward (peft_gp's attention route), no projection. Both GP models store one task
    first, so their projection is active.
    """
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
    if not plans:
        return {}
    models, optimizers, baselines, updates = {}, {}, {}, {}
    for name, config, baseline in plans:
        torch.manual_seed(args.seed)
        model = build_peft_model(copy.deepcopy(base), config)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        if baseline is not None:
            start = time.perf_counter()
            report = peft_gp.update_memory(model, task_batches)
            updates[name] = {
                "seconds": round(time.perf_counter() - start, 3),
                "groups": len(report),
                "capacity_mean": round(statistics.mean(r["basis_size"] / r["dim"] for r in report.values()), 4),
            }
            assert peft_gp.GPProjector(model).attach(optimizer).active, "the GP memory should hold one task"
        models[name], optimizers[name], baselines[name] = model, optimizer, baseline
    names = list(models)
    step_times, opt_times = interleaved_steps(models, optimizers, timed_batch, args)
    print()
    print(
        f"{f'adapter (r={args.bottleneck}), prompt learning ({args.virtual_tokens} tokens)':<28} | "
        "ms/step median (IQR) | paired vs baseline | "
        "projection ms (% of step) | memory update s"
    )
    rows = []
    for name in names:
        baseline = baselines[name] or name
        ms, (q1, q3) = median_ms(step_times[name]), quartiles_ms(step_times[name])
        paired = statistics.median(a / b for a, b in zip(step_times[name], step_times[baseline]))
        hook = median_ms(opt_times[name]) - median_ms(opt_times[baseline])
        rows.append(
            {
                "configuration": name,
                "baseline": baseline,
                "ms_per_step_median": round(ms, 1),
                "ms_per_step_q1": round(q1, 1),
                "ms_per_step_q3": round(q3, 1),
                "paired_ratio_vs_baseline": round(paired, 4),
                "projection_ms": round(hook, 2),
                "projection_share_of_step": round(hook / ms, 4),
                "memory_update": updates.get(name),
                "timed_steps": len(step_times[name]),
            }
        )
        update = f"{updates[name]['seconds']:.2f}" if name in updates else "-"
        print(
            f"{name:<28} | {ms:6.0f} ({q1:5.0f}-{q3:5.0f}) | {paired:5.3f}x vs {baseline:<16} | "
            f"{hook:8.2f} ({100 * hook / ms:.2f}%) | {update}"
        )
    return {"rows": rows, "raw_step_seconds": {n: [round(t, 5) for t in v] for n, v in step_times.items()}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet()  # the per-task "memory fills ... groups" warning is summarised in the table instead
    began = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)  # other processes on the machine bias timings
    model_dir = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = bbc_texts(args.task_examples, args.seed)
    enc = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    task = {k: enc[k] for k in INPUT_KEYS if k in enc}
    task["labels"] = torch.tensor([i % 2 for i in range(len(texts))])  # labels only feed the loss
    task_batches = batches(task, args.batch_size)
    timed_batch = task_batches[0]

    torch.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=5)
    if "lora" not in args.paradigms.split(","):  # prompt learning alone
        other_paradigms = paradigm_rows(base, task_batches, timed_batch, args)
        worst = max(r["projection_share_of_step"] for r in other_paradigms["rows"])
        print(f"target: projection <= 5% of the step: {100 * worst:.2f}% ({'met' if worst <= 0.05 else 'NOT met'})")
        record = {
            "benchmark": "gp_step_overhead",
            "date": now(),
            "machine": machine_record(load_start),
            "settings": vars(args),
            "other_paradigms": other_paradigms,
            "total_seconds": round(time.perf_counter() - began, 1),
        }
        write_record(args.output, record)
        return record
    lora = dict(task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"])
    models, optimizers, projectors, memory_updates = {}, {}, {}, {}
    for name, config in [
        (PLAIN, LoraConfig(**lora)),
        (
            "GP-LoRA gradient",
            peft_gp.GPLoraConfig(
                **lora,
                gp_threshold=args.gp_threshold,
                gp_projection="gradient",
                gp_memory_samples=args.gp_memory_samples,
            ),
        ),
        (
            "GP-LoRA update",
            peft_gp.GPLoraConfig(
                **lora,
                gp_threshold=args.gp_threshold,
                gp_projection="update",
                gp_memory_samples=args.gp_memory_samples,
            ),
        ),
    ]:
        torch.manual_seed(args.seed)
        model = build_peft_model(copy.deepcopy(base), config)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if name != PLAIN:
            # store one task so that the projection is active (timed: the memory update of one task)
            start = time.perf_counter()
            report = peft_gp.update_memory(model, task_batches)  # gp_memory_samples examples
            memory_updates[name] = {
                "seconds": time.perf_counter() - start,
                "examples": min(args.gp_memory_samples, args.task_examples),
                "capacity_mean": statistics.mean(r["basis_size"] / r["dim"] for r in report.values()),
            }
            projector = peft_gp.GPProjector(model).attach(optimizer)
            assert projector.active, "the GP memory should hold one task"
            projectors[name] = projector
        models[name], optimizers[name] = model, optimizer
    print(
        f"MiniLM + LoRA r={args.rank} (query, value), batch {args.batch_size} x {args.max_length} tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{args.warmup} warmup + {args.steps} timed steps per configuration, interleaved",
        flush=True,
    )

    # ---- interleaved plain-loop step timing -----------------------------------------------------------------------
    step_times, opt_times = interleaved_steps(models, optimizers, timed_batch, args, progress=True)
    names = list(models)
    for name, projector in projectors.items():
        removed = projector.pop_stats().get("gp_grad_removed")
        memory_updates[name]["grad_removed_share"] = removed

    # ---- one task: a real epoch of GP-LoRA training vs the memory update ----------------------------------------
    epoch_model, epoch_optimizer = models["GP-LoRA update"], optimizers["GP-LoRA update"]
    start = time.perf_counter()
    for batch in task_batches:
        train_step(epoch_model, epoch_optimizer, batch)
    epoch_seconds = time.perf_counter() - start
    forward_before = forward_only(epoch_model, task_batches, args.gp_memory_samples)
    start = time.perf_counter()
    second_report = peft_gp.update_memory(epoch_model, task_batches)
    second_update = time.perf_counter() - start
    # the forward passes alone, timed on both sides of the update (machine noise)
    forward_seconds = (forward_before + forward_only(epoch_model, task_batches, args.gp_memory_samples)) / 2
    full = peft_gp.get_memory(epoch_model).full_groups()
    full_groups = len(full)
    full_kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(g.rsplit(".", 1)[-1] for g in full).items()))

    other_paradigms = paradigm_rows(base, task_batches, timed_batch, args)

    trainer_times = {}
    if args.trainer:
        trainer_times = trainer_rounds(models, Dataset.from_dict({k: v.tolist() for k, v in task.items()}), args)

    # ---- report ----------------------------------------------------------------------------------------------------
    plain = median_ms(step_times[PLAIN])
    plain_opt = median_ms(opt_times[PLAIN])
    rows = []
    print()
    print(
        f"{'configuration':<18} | ms/step median (IQR) | vs plain | paired | optimizer.step() ms | "
        "projection ms (% of step)"
    )
    for name in names:
        ms, (q1, q3) = median_ms(step_times[name]), quartiles_ms(step_times[name])
        # steps of one round ran back to back: the median of their ratios cancels slow load drifts
        paired = statistics.median(a / b for a, b in zip(step_times[name], step_times[PLAIN]))
        opt_ms = median_ms(opt_times[name])
        hook = opt_ms - plain_opt
        rows.append(
            {
                "configuration": name,
                "ms_per_step_median": round(ms, 1),
                "ms_per_step_q1": round(q1, 1),
                "ms_per_step_q3": round(q3, 1),
                "ratio_vs_plain": round(ms / plain, 4),
                "paired_ratio_vs_plain": round(paired, 4),
                "optimizer_step_ms_median": round(opt_ms, 2),
                "projection_ms": round(hook, 2) if name != PLAIN else 0.0,
                "projection_share_of_step": round(hook / ms, 4) if name != PLAIN else 0.0,
                "timed_steps": len(step_times[name]),
            }
        )
        extra = f"{hook:13.2f} ({100 * hook / ms:.2f}%)" if name != PLAIN else f"{'-':>13}"
        print(
            f"{name:<18} | {ms:6.0f} ({q1:5.0f}-{q3:5.0f}) | {ms / plain:7.3f}x | {paired:5.3f}x | {opt_ms:19.2f} | "
            f"{extra}"
        )
    trainer_rows = []
    if trainer_times:
        trainer_plain = median_ms(trainer_times[PLAIN])
        print()
        print(f"{'via Trainer':<18} | ms/step median (IQR) | vs Trainer + LoRA")
        for name in names:
            ms, (q1, q3) = median_ms(trainer_times[name]), quartiles_ms(trainer_times[name])
            label = "Trainer + LoRA" if name == PLAIN else f"GPTrainer {name.split()[-1]}"
            trainer_rows.append(
                {
                    "configuration": label,
                    "ms_per_step_median": round(ms, 1),
                    "ms_per_step_q1": round(q1, 1),
                    "ms_per_step_q3": round(q3, 1),
                    "ratio_vs_plain": round(ms / trainer_plain, 4),
                    "timed_steps": len(trainer_times[name]),
                }
            )
            print(f"{label:<18} | {ms:6.0f} ({q1:5.0f}-{q3:5.0f}) | {ms / trainer_plain:7.3f}x")

    first = memory_updates["GP-LoRA update"]
    examples = first["examples"]
    shares = {
        "first_task_vs_1_epoch": first["seconds"] / epoch_seconds,
        "second_task_vs_1_epoch": second_update / epoch_seconds,
        "second_task_vs_3_epochs": second_update / (3 * epoch_seconds),
        "second_task_vs_5_epochs": second_update / (5 * epoch_seconds),
    }
    print()
    print(f"memory update of one task (update_memory over {examples} examples, gp_threshold {args.gp_threshold:g}):")
    print(
        f"  first task (empty memory)       {first['seconds']:6.2f} s   (capacity used after: "
        f"{100 * first['capacity_mean']:.0f}% of the feature dims, mean over groups)"
    )
    print(
        f"  second task (memory of 1 task)  {second_update:6.2f} s   = plain forward passes {forward_seconds:.2f} s "
        f"+ hooks, Gram matrices, eigh {second_update - forward_seconds:.2f} s; {full_groups}/{len(second_report)} "
        f"groups full ({full_kinds or 'none'})"
    )
    print(
        f"  task training: 1 epoch over {args.task_examples} examples ({len(task_batches)} GP-LoRA steps) "
        f"{epoch_seconds:6.2f} s (measured, {1000 * epoch_seconds / len(task_batches):.0f} ms/step)"
    )
    print(
        f"  update / training: {100 * shares['first_task_vs_1_epoch']:.1f}% (first task), "
        f"{100 * shares['second_task_vs_1_epoch']:.1f}% (second task) of 1 epoch; derived for the second task: "
        f"{100 * shares['second_task_vs_3_epochs']:.1f}% of 3 epochs, "
        f"{100 * shares['second_task_vs_5_epochs']:.1f}% of 5 epochs"
    )
    worst_step = (
        max(
            [r["paired_ratio_vs_plain"] for r in rows]
            + [r["paired_ratio_vs_baseline"] for r in other_paradigms.get("rows", [])]
        )
        - 1
    )
    worst_hook = max(r["projection_share_of_step"] for r in rows + other_paradigms.get("rows", []))
    one_epoch = max(shares["first_task_vs_1_epoch"], shares["second_task_vs_1_epoch"])
    print(
        f"targets: GP overhead <= 5% of the step: projection {100 * worst_hook:.2f}% "
        f"({'met' if worst_hook <= 0.05 else 'NOT met'}), whole step (paired ratio) {100 * worst_step:+.1f}% "
        f"({'met' if worst_step <= 0.05 else 'NOT met'}, step noise included); memory update <= 10% of the task's "
        f"training: {100 * one_epoch:.1f}% of a 1-epoch task ({'met' if one_epoch <= 0.10 else 'NOT met'})"
    )
    total = time.perf_counter() - began
    print(
        f"total time {total:.0f}s; 1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end "
        f"on {os.cpu_count()} CPUs (other processes inflate the times)"
    )

    record = {
        "benchmark": "gp_step_overhead",
        "date": now(),
        "machine": machine_record(load_start),
        "settings": vars(args),
        "plain_loop": rows,
        "trainer": trainer_rows,
        "other_paradigms": other_paradigms,
        "memory_update": {
            "examples": examples,
            "first_task_seconds": round(first["seconds"], 3),
            "second_task_seconds": round(second_update, 3),
            "second_task_forward_only_seconds": round(forward_seconds, 3),
            "full_groups_after_second": full_groups,
            "groups": len(second_report),
            "capacity_mean_after_first": round(first["capacity_mean"], 4),
            "capacity_mean_after_second": round(
                statistics.mean(r["basis_size"] / r["dim"] for r in second_report.values()), 4
            ),
            "task_epoch_seconds": round(epoch_seconds, 3),
            "task_epoch_examples": args.task_examples,
            "task_epoch_steps": len(task_batches),
            "shares": {k: round(v, 4) for k, v in shares.items()},
        },
        "grad_removed_share": {n: m.get("grad_removed_share") for n, m in memory_updates.items()},
        "raw_step_seconds": {n: [round(t, 5) for t in v] for n, v in step_times.items()},
        "total_seconds": round(total, 1),
    }
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

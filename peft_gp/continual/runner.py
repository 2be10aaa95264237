"""The task loop: ``run_sequence(config)`` trains a task stream one task at a time and evaluates after each task.

Everything the config names is loaded and checked first (data, classes, tokenizer or image processor, the model and
its head), so a bad input fails before any training. Then, for the GP run and (with ``compare_baseline``) the plain
run, from the same initial weights:

1. each task trains with ``GPTrainer`` (projected from the second task on; memory stored when ``train()`` ends) or,
   for the baseline, ``transformers.Trainer`` on the same sequence, with the head's logits masked per task;
2. after each task, the model is evaluated on the test sets of all tasks seen so far -> accuracy matrix ``R[t][k]``;
3. the run writes ``result.json``, ``summary.md`` and the plots to the output folder.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ..wiring.guard import GPCapacityWarning
from ..wiring.persistence import save_pretrained
from .config import RunConfig
from .generative_runner import run_generative
from .heads import default_heads
from .loading import UP_PROJECTIONS, prepare, up_projections_whole
from .report import write_outputs
from .results import MethodResult, RunResult
from .stream import frozen_stream, train_stream
from .tasks import Task


def run_info(initial_states: list[dict[str, torch.Tensor]], began: float) -> dict:
    """The run's record beside its results: versions, threads, whether the methods started alike, total time."""
    same_start = all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(initial_states, initial_states[1:])
    )
    return {
        "peft_gp_version": metadata.version("peft-gp"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "same_initial_weights": same_start if len(initial_states) > 1 else None,
        "total_seconds": round(time.perf_counter() - began, 2),
    }


def run_sequence(
    config: RunConfig | None = None,
    tasks: Sequence[Task] | None = None,
    model: nn.Module | None = None,
    processor=None,
    say=print,
) -> RunResult:
    """Run the task stream of ``config`` (with GP, and without it when ``compare_baseline``) and write the outputs.

    Args:
        config: The run (``RunConfig()``: the offline BBC News default).
        tasks: A ready task stream (``class_incremental_split``, ``dataset_sequence``) instead of ``config.dataset``.
        model: A base classification model (not a PEFT model) instead of ``config.model``.
        processor: The tokenizer or image processor for raw ``tasks`` (default: ``config.model``'s).
        say: Where progress lines go (``print``; ``lambda *_: None`` for silence).
    Returns:
        The ``RunResult``: accuracy matrices, metrics, per-task timings and the paths of the files written.
    """
    config = config or RunConfig()
    if config.scenario == "generative":  # a causal LM on prompt -> answer tasks: its own loading, loop and metrics
        return run_generative(config, tasks, model, processor, say)
    began = time.perf_counter()
    encoded, base_model = prepare(config, tasks, model, processor)
    config = config.replace(heads=default_heads(config, base_model))
    say(
        f"{config.name}: {config.scenario}-incremental, {len(encoded)} tasks "
        f"{[t.name for t in encoded]}, {sum(len(t.train) for t in encoded)} train / "
        f"{sum(len(t.test) for t in encoded)} test examples, head masking '{config.masking}', paradigm "
        f"'{config.paradigm}', {config.epochs:g} epochs per task"
    )
    if up_projections_whole(config) and (config.gp or config.compare_baseline):
        say(f"GP keeps the bases of {UP_PROJECTIONS[config.paradigm]} whole (its input space is a few dimensions "
            f"wide): the main head '{config.heads[0]}' needs old classes' features to stay put. Another "
            "gp_threshold_pattern in gp_kwargs replaces this.")  # fmt: skip
    methods = [config.gp] + ([not config.gp] if config.compare_baseline else [])
    results: dict[str, MethodResult] = {}
    initial_states = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GPCapacityWarning)  # full layers are counted per task instead
        for gp in methods:
            result, initial = train_stream(base_model, encoded, config, gp, say)
            results[result.method] = result
            initial_states.append(initial)
        if config.compare_frozen:  # the replay-free peer: the base model's features with the statistics heads
            results["frozen"] = frozen_stream(base_model, encoded, config, say)
    run = RunResult(config=config, stream=[task.describe() for task in encoded], results=results,
                    info=run_info(initial_states, began))  # fmt: skip
    if config.save_adapters:  # adapter weights (and, for GP, gp_memory.safetensors) of each method
        for result in (result for result in results.values() if result.model is not None):
            folder = Path(config.run_dir) / f"adapter_{result.method}"
            save_pretrained(result.model, str(folder))
            run.paths[f"adapter_{result.method}"] = str(folder)
    write_outputs(run, Path(config.run_dir))
    return run

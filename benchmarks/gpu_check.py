"""One-command GPU check: plain LoRA against GP-LoRA on a ~1B Llama-shaped model in bf16, two tasks.

What it measures
    A Llama-shaped causal LM built from its config with random weights (``--shape``, default the TinyLlama-1.1B
    shape: d 2048, FFN 5632, 22 layers, 32 heads, 4 key/value heads, vocabulary 32000), in bf16 on the GPU, with LoRA
    r = 16 on all linear layers (PEFT casts the adapter to float32). Two tasks of random tokens (task t draws its
    tokens from its own half of the vocabulary), trained with ``transformers.Trainer`` (AdamW, constant ``--lr``):

    * plain: ``LoraConfig`` and ``Trainer``;
    * GP: ``GPLoraConfig`` (``gp_projection="update"``, ``--gp-threshold``) and ``Trainer`` with ``GPCallback``; the
      memory is updated after task 1 (``peft_gp.update_memory`` over ``--memory-samples`` examples of task 1), so task
      2's steps are projected.

    Reported: the median time of task 2's training steps (after ``--warmup-steps``; the GPU synchronised around each
    step) and the ratio GP / plain; the memory update's time and its peak GPU memory above what was allocated when it
    began (``torch.cuda.max_memory_allocated``), beside ``peft-gp plan``'s estimate for the same fill; the peak GPU
    memory of task 2's training; the old-output drift: task 1's logits on a held batch after task 2 against after
    task 1, relative to those logits and to the adapter's own effect on them (logits with the adapter minus without);
    the sizes of ``gp_memory.safetensors`` and ``adapter_model.safetensors`` beside the plan's. A QLoRA variant (the
    same base quantised to 4-bit NF4 by bitsandbytes, bf16 compute) runs only where bitsandbytes imports and CUDA is
    available, and while the time budget allows; otherwise the reason it was skipped is printed and recorded.

How to run (from the repository root, on a machine with one CUDA GPU; about 5 minutes on a recent GPU, at most 8)::

    python benchmarks/gpu_check.py                        # the ~1B check; JSON to benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --shape llama-3.2-1b   # the Llama-3.2-1B shape (FFN 8192: a slower update)
    python benchmarks/gpu_check.py --quick                # CPU, a tiny model, seconds: checks the script itself

Never needed by the tests (they run ``--quick``). Not yet run on a GPU: see docs/plan.md.
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import begin, benchmark_record, environment, use_preset, write_record

environment(passive_omp=False)

import argparse
import gc
import importlib.util
import statistics
import tempfile
import time
import traceback

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import peft_gp
from peft_gp.plan import plan_peft_model

SHAPES = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64),
}  # fmt: skip
FULL = dict(shape="tinyllama-1.1b", device="cuda", batch_size=8, seq_len=256, warmup_steps=3, steps=20,
            memory_samples=32, lr=5e-4, time_budget=480.0)  # fmt: skip
QUICK = dict(shape="tiny", device="cpu", batch_size=4, seq_len=16, warmup_steps=1, steps=3, memory_samples=8,
             lr=1e-2, time_budget=120.0)  # fmt: skip
LORA = dict(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
GIB = 2**30
PLAN_KEYS = ("memory_file_bytes", "memory_file_bytes_full", "adapter_file_bytes", "update_gram_bytes",
             "update_peak_bytes", "projection_flops")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, a tiny model, a few steps (seconds)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape (tinyllama-1.1b)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default cuda (pick the GPU with CUDA_VISIBLE_DEVICES); --quick: cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the base's dtype")
    parser.add_argument("--batch-size", type=int, default=None, help="(8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (256)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per task (3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per task (20)")
    parser.add_argument("--memory-samples", type=int, default=None, help="examples of task 1 in its memory (32)")
    parser.add_argument("--lr", type=float, default=None, help="(5e-4)")
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; QLoRA is skipped past 55%% (480)")
    parser.add_argument("--no-qlora", action="store_true", help="skip the QLoRA variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON record (default benchmarks/results/gpu_check.json)")
    args = parser.parse_args(argv)
    use_preset(args, "gpu_check", FULL, QUICK)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False): run it on a machine with "
                         "one, or use --quick (a tiny model on CPU) to check the script.")  # fmt: skip
    if args.device.type == "cuda":
        args.device = torch.device("cuda", torch.cuda.current_device())  # where Trainer puts the model too
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_bytes(device: torch.device, peak: bool = False) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def base_model(args: argparse.Namespace):
    """The random-weight model of ``--shape``, built on the device in ``--dtype`` (same seed: same weights)."""
    torch.manual_seed(args.seed)
    config = LlamaConfig(**SHAPES[args.shape])
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    return model.eval()


def quantized_model(folder: str, args: argparse.Namespace):
    """The saved base, quantised to 4-bit NF4 by bitsandbytes on load (bf16 compute)."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=getattr(torch, args.dtype))  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                device_map={"": args.device.index}).eval()  # fmt: skip


def task_data(task_id: int, rows: int, args: argparse.Namespace, seed: int) -> Dataset:
    """Random token sequences from task ``task_id``'s own half of the vocabulary (labels: the inputs)."""
    half = SHAPES[args.shape]["vocab_size"] // 2
    generator = torch.Generator().manual_seed(1000 * task_id + seed)
    ids = torch.randint(task_id * half, (task_id + 1) * half, (rows, args.seq_len), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * args.seq_len] * rows, "labels": ids})


class StepTimer(TrainerCallback):
    """Wall time of every training step, the GPU synchronised at both ends (the projection hooks included)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.started = device, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self.started)


def train_task(model, dataset: Dataset, args: argparse.Namespace, callbacks: list, folder: str) -> list[float]:
    """One task with ``Trainer``; the timed steps' seconds (after the warmup steps)."""
    timer = StepTimer(args.device)
    training = TrainingArguments(
        output_dir=folder, per_device_train_batch_size=args.batch_size, max_steps=args.warmup_steps + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, logging_strategy="no",
        save_strategy="no", report_to=[], disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
        use_cpu=args.device.type == "cpu", remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[timer, *callbacks])  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the table below says it all
    trainer.train()
    return timer.seconds[args.warmup_steps :]


@torch.no_grad()
def logits(model, batch: dict, adapter: bool = True) -> torch.Tensor:
    model.eval()
    inputs = {key: value.to(next(model.parameters()).device) for key, value in batch.items() if key != "labels"}
    if adapter:
        return model(**inputs).logits.float()
    with model.disable_adapter():
        return model(**inputs).logits.float()


def drift(before: torch.Tensor, after: torch.Tensor, without: torch.Tensor) -> dict:
    change = (after - before).norm().item()
    return {"relative_to_logits": change / before.norm().item(),
            "relative_to_adapter_effect": change / max((before - without).norm().item(), 1e-30)}  # fmt: skip


def timed_update(model, tasks: list[Dataset], args: argparse.Namespace) -> dict:
    """Store task 1: seconds, and peak GPU memory above what was allocated when the update began."""
    loader = DataLoader(tasks[0].select(range(args.memory_samples)), batch_size=args.batch_size,
                        collate_fn=default_data_collator)  # fmt: skip
    synchronize(args.device)
    start_bytes = gpu_bytes(args.device)
    reset_peak(args.device)
    started = time.perf_counter()
    peft_gp.update_memory(model, loader, max_samples=args.memory_samples)
    synchronize(args.device)
    seconds = time.perf_counter() - started
    peak = gpu_bytes(args.device, peak=True)
    return {"seconds": round(seconds, 3), "peak_above_start_bytes": None if peak is None else peak - start_bytes}


def file_sizes(model, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        peft_gp.save_pretrained(model, folder)
        sizes = {f"{name}_bytes": os.path.getsize(os.path.join(folder, f"{name}.safetensors"))
                 for name in ("gp_memory", "adapter_model")}  # fmt: skip
        return {**sizes, "save_seconds": round(time.perf_counter() - started, 3)}


def run_method(method: str, base, tasks: list[Dataset], held: dict, args: argparse.Namespace) -> dict:
    """Train the two tasks with ``method`` (plain, gp) on ``base``; every measurement of the run."""
    gp = method.startswith("gp")
    options = dict(LORA, gp_threshold=args.gp_threshold, gp_memory_samples=args.memory_samples)
    if gp:
        model = peft_gp.get_peft_model(base, peft_gp.GPLoraConfig(**options))
    else:
        model = get_peft_model(base, LoraConfig(**LORA))
    callbacks = [peft_gp.GPCallback(update_memory=False, per_task_checkpoints=False)] if gp else []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result: dict = {"method": method, "trainable_params": trainable}
    with tempfile.TemporaryDirectory() as folder:
        result["task1_step_seconds"] = train_task(model, tasks[0], args, callbacks, folder)
        before, without = logits(model, held), logits(model, held, adapter=False)
        if gp:
            result["memory_update"] = timed_update(model, tasks, args)
            memory = peft_gp.get_memory(model)
            fills = {name: memory.bases[name].shape[1] / dim for name, dim in memory.dims.items()}
            planned = plan_peft_model(model, fill=fills)
            stored, worst = sum(b.numel() for b in memory.bases.values()), sum(d * d for d in memory.dims.values())
            result["basis_fill"] = round(stored / worst, 4)
            result["plan"] = {key: getattr(planned, key) for key in PLAN_KEYS}
        synchronize(args.device)
        reset_peak(args.device)
        result["task2_step_seconds"] = train_task(model, tasks[1], args, callbacks, folder)
        result["train_peak_bytes"] = gpu_bytes(args.device, peak=True)
    result["drift"] = drift(before, logits(model, held), without)
    if gp:
        result.update(file_sizes(model, args))
    result["step_ms_median"] = round(1000 * statistics.median(result["task2_step_seconds"]), 3)
    return result


def qlora_skip_reason(args: argparse.Namespace, elapsed: float) -> str | None:
    """Why the QLoRA variant cannot run here (``None``: it can)."""
    if args.no_qlora:
        return "--no-qlora"
    if args.device.type != "cuda" or not torch.cuda.is_available():
        return "QLoRA needs CUDA (bitsandbytes' 4-bit training path); this run is on " + str(args.device)
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means the same here
        return f"bitsandbytes does not import ({type(error).__name__}: {error})"
    if elapsed > 0.55 * args.time_budget:
        return f"time budget: {elapsed:.0f} s of --time-budget {args.time_budget:.0f} s already spent"
    return None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_all(args: argparse.Namespace, tasks: list[Dataset], held: dict, began: float) -> dict:
    """plain and GP on the bf16 base, then (where it can run) both on its 4-bit quantisation."""
    runs = {}
    for method in ("plain", "gp"):
        base = base_model(args)
        runs[method] = run_method(method, base, tasks, held, args)
        del base
        release(args.device)
    reason = qlora_skip_reason(args, time.perf_counter() - began)
    if reason is not None:
        print(f"QLoRA variant skipped: {reason}")
        runs["qlora"] = {"skipped": reason}
        return runs
    try:  # a variant: its failure is recorded beside the main results, not raised over them
        with tempfile.TemporaryDirectory() as folder:
            base = base_model(args)
            base.save_pretrained(folder)
            del base
            release(args.device)
            quantized = {}
            for method in ("plain", "gp"):
                quantized[f"qlora_{method}"] = run_method(f"{method}_qlora", quantized_model(folder, args), tasks,
                                                          held, args)  # fmt: skip
                release(args.device)
        runs.update(quantized)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        runs["qlora"] = {"failed": f"{type(error).__name__}: {error}"[:2000]}
    return runs


def cell(value, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value / scale:.{digits}f}"


def print_table(runs: dict, args: argparse.Namespace) -> None:
    pairs = [("plain", "gp", args.dtype)] + ([("qlora_plain", "qlora_gp", "QLoRA nf4")] if "qlora_gp" in runs else [])
    print(f"\n{args.shape} ({args.dtype}, {args.device}), LoRA r=16 on all linear layers, batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.steps} timed steps per task, gp_threshold {args.gp_threshold}:")  # fmt: skip
    print("| base | step ms plain | step ms GP | ratio GP/plain | peak train GiB plain / GP | memory update s "
          "| update peak GiB (plan) | drift plain / GP (of adapter effect) | gp_memory MB (plan) | adapter MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for plain_key, gp_key, label in pairs:
        plain, gp = runs[plain_key], runs[gp_key]
        update, planned = gp["memory_update"], gp["plan"]
        print(f"| {label} | {plain['step_ms_median']:.1f} | {gp['step_ms_median']:.1f} | {gp['step_time_ratio']:.3f} "
              f"| {cell(plain['train_peak_bytes'], GIB)} / {cell(gp['train_peak_bytes'], GIB)} "
              f"| {update['seconds']:.2f} | {cell(update['peak_above_start_bytes'], GIB)} "
              f"({planned['update_peak_bytes'] / GIB:.2f}) "
              f"| {plain['drift']['relative_to_adapter_effect']:.3g} / "
              f"{gp['drift']['relative_to_adapter_effect']:.3g} "
              f"| {gp['gp_memory_bytes'] / 1e6:.2f} ({planned['memory_file_bytes'] / 1e6:.2f}) "
              f"| {gp['adapter_model_bytes'] / 1e6:.2f} |")  # fmt: skip
    if "qlora" in runs:
        print(f"QLoRA: {', '.join(f'{key} ({value})' for key, value in runs['qlora'].items())}")


def device_record(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type}
    properties = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": properties.name, "total_memory_bytes": properties.total_memory,
            "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(device))}  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start, began = begin()
    rows = args.warmup_steps + args.steps
    tasks = [task_data(task_id, rows * args.batch_size, args, args.seed) for task_id in (0, 1)]
    held = default_data_collator([tasks[0][i] for i in range(min(4, len(tasks[0])))])  # task 1's old outputs
    runs = run_all(args, tasks, held, began)
    for plain_key, gp_key in (("plain", "gp"), ("qlora_plain", "qlora_gp")):
        if gp_key in runs:
            runs[gp_key]["step_time_ratio"] = round(runs[gp_key]["step_ms_median"] / runs[plain_key]["step_ms_median"],
                                                    4)  # fmt: skip
    print_table(runs, args)
    total = time.perf_counter() - began
    print(f"total {total:.0f} s (budget {args.time_budget:.0f} s)")
    settings = {key: str(value) if isinstance(value, torch.device) else value for key, value in vars(args).items()}
    record = benchmark_record("gpu_check", load_start, total, settings, {"device": device_record(args.device)},
                              shape=SHAPES[args.shape], lora=LORA, runs=runs)  # fmt: skip
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU (before CUDA starts): on several, Trainer would
    main()  # wrap the model in DataParallel

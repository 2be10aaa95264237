"""Generative tasks for a causal LM: encoding prompt -> answer pairs, and the metrics read after each task.

* Training examples are ``prompt + " " + answer + eos`` with ``labels`` = -100 on the prompt (and on padding), so the
  loss is the answer's only; the prompt is the task's template around the text, and the text is cut so that the
  example fits ``max_length`` (built-in templates put the question after the text, so it is never cut).
* ``evaluate_generative``: exact match of greedy generation (a few new tokens, left-padded batches; the generated
  text up to its first line break and the answer, both stripped and lowercased) and the mean answer loss (per answer
  token, teacher-forced).
* ``perplexity``: exp of the mean next-token loss over general text, every non-padding token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from .run_checks import RunConfigError
from .tasks import Task

IGNORE = -100
SPLITS = ("train", "test")


def normalise(text: str) -> str:
    """The answer's comparable form: the first line, stripped and lowercased."""
    return text.strip().split("\n", 1)[0].strip().lower()


def _prompt_ids(tokenizer, template: str, text: str, budget: int, keep_end: bool) -> list[int]:
    prefix, suffix = template.split("{text}")
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = budget - len(head) - len(tail)
    if room < 1:
        raise RunConfigError(f"max_length is too small for the template {template!r}: raise max_length.")
    body = body[-room:] if keep_end else body[:room]
    return head + body + tail


def encode_pairs(data: Dataset, tokenizer, template: str, max_length: int) -> Dataset:
    """``input_ids``, ``attention_mask``, ``labels`` (prompt masked), ``prompt_length`` and ``answer`` per example."""
    if "{text}" not in template or template.count("{text}") != 1:
        raise RunConfigError(f"A prompt template needs '{{text}}' exactly once, got {template!r}.")
    if tokenizer.eos_token_id is None:
        raise RunConfigError("The tokenizer has no eos_token: the answer's end cannot be learned. Set one.")
    rows: dict[str, list[Any]] = {k: [] for k in ("input_ids", "attention_mask", "labels", "prompt_length", "answer")}
    for text, answer in zip(data["text"], data["answer"]):
        answer_ids = tokenizer(" " + str(answer).strip(), add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + [tokenizer.eos_token_id]
        prompt = _prompt_ids(tokenizer, template, text, max_length - len(answer_ids), keep_end=template == "{text}")
        rows["input_ids"].append(prompt + answer_ids)
        rows["attention_mask"].append([1] * (len(prompt) + len(answer_ids)))
        rows["labels"].append([IGNORE] * len(prompt) + answer_ids)
        rows["prompt_length"].append(len(prompt))
        rows["answer"].append(str(answer))
    return Dataset.from_dict(rows)


def encode_generative_tasks(tasks: Sequence[Task], tokenizer, max_length: int) -> list[Task]:
    """Each task's splits encoded by ``encode_pairs`` with its ``info["template"]`` (``"{text}"`` if none)."""
    encoded = []
    for task in tasks:
        template = task.info.get("template", "{text}")
        splits = {name: encode_pairs(getattr(task, name), tokenizer, template, max_length) for name in SPLITS}
        encoded.append(Task(name=task.name, train=splits["train"], test=splits["test"], classes=[],
                            class_names=task.class_names, task_id=task.task_id, info=dict(task.info)))  # fmt: skip
    return encoded


def encode_text(data: Dataset, tokenizer, max_length: int) -> Dataset:
    """General text as ``input_ids``/``attention_mask`` (cut to ``max_length``) for perplexity and the memory."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in data["text"]]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})


class PadCollator:
    """Pads ``input_ids``/``attention_mask``/``labels`` to the batch's longest example, on the right (training and
    losses) or the left (generation); other columns are dropped."""

    def __init__(self, pad_token_id: int, side: str = "right"):
        self.pad_token_id, self.side = pad_token_id, side

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list] = {"input_ids": [], "attention_mask": []}
        if "labels" in features[0]:
            batch["labels"] = []
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE}
        for feature in features:
            gap = width - len(feature["input_ids"])
            for key in batch:
                pad = [fill[key]] * gap
                values = list(feature[key])
                batch[key].append(pad + values if self.side == "left" else values + pad)
        return {key: torch.tensor(values, dtype=torch.long) for key, values in batch.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed next-token loss over the labelled positions of a right-padded batch, and their count."""
    device = _device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]
    losses = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return float(losses), int((labels != IGNORE).sum())


@torch.no_grad()
def answer_loss(model: nn.Module, data: Dataset, pad_token_id: int, batch_size: int = 16) -> float:
    """Mean loss per answer token (teacher-forced) over an encoded split."""
    model.eval()
    loader = DataLoader(data.select_columns(["input_ids", "attention_mask", "labels"]), batch_size=batch_size,
                        collate_fn=PadCollator(pad_token_id))  # fmt: skip
    total, count = 0.0, 0
    for batch in loader:
        loss, n = _token_losses(model, batch)
        total, count = total + loss, count + n
    return total / max(count, 1)


@torch.no_grad()
def perplexity(model: nn.Module, data: Dataset, pad_token_id: int, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over every non-padding token of encoded general text."""
    model.eval()
    labelled = data.map(lambda row: {"labels": row["input_ids"]})
    loader = DataLoader(labelled, batch_size=batch_size, collate_fn=PadCollator(pad_token_id))
    total, count = 0.0, 0
    for batch in loader:
        loss, n = _token_losses(model, batch)
        total, count = total + loss, count + n
    return math.exp(total / max(count, 1))


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, data: Dataset, batch_size: int = 16,
                     max_new_tokens: int | None = None) -> list[str]:  # fmt: skip
    """Greedy continuations of each example's prompt (left-padded batches), decoded up to the first line break."""
    model.eval()
    if max_new_tokens is None:
        max_new_tokens = max(len(ids) - n for ids, n in zip(data["input_ids"], data["prompt_length"]))
    prompts = [{"input_ids": ids[:n], "attention_mask": [1] * n}
               for ids, n in zip(data["input_ids"], data["prompt_length"])]  # fmt: skip
    collate = PadCollator(tokenizer.pad_token_id, side="left")
    device = _device(model)
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = collate(prompts[start : start + batch_size])
        output = model.generate(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        new = output[:, batch["input_ids"].shape[1] :]
        answers += [normalise(tokenizer.decode(row, skip_special_tokens=True)) for row in new]
    return answers


def evaluate_generative(model: nn.Module, tokenizer, data: Dataset, batch_size: int = 16) -> dict[str, Any]:
    """``exact_match`` (share of greedy answers equal to the reference, normalised) and ``answer_loss``."""
    predicted = generate_answers(model, tokenizer, data, batch_size)
    reference = [normalise(a) for a in data["answer"]]
    exact = sum(p == r for p, r in zip(predicted, reference)) / len(reference)
    return {"exact_match": exact, "answer_loss": answer_loss(model, data, tokenizer.pad_token_id, batch_size),
            "predictions": predicted}  # fmt: skip

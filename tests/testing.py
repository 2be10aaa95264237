"""The shared helpers of the test suite, in one module: tiny models built from configs (no downloads), the model
matrix, tiny datasets and training settings, the fake Hub's token and checks, the continual runner's tiny config.
``conftest.py`` holds only fixtures; test modules import from here, never from one another (test_architecture.py)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    default_data_collator,
)
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

import peft_gp  # noqa: E402
from peft_gp import GPAdapterConfig, GPLoraConfig, GPProjector, GPTrainer  # noqa: E402
from peft_gp.continual import RunConfig  # noqa: E402
from peft_gp.wiring.grams import collect_grams  # noqa: E402
from peft_gp.wiring.memory import GPMemory  # noqa: E402
from peft_gp.wiring.memory_file import IMPORTANCE_SUFFIX  # noqa: E402
from peft_gp.wiring.state import resolve_groups  # noqa: E402

from .fake_hub import FakeHub  # noqa: E402

# ---- tiny models and the model matrix ------------------------------------------------------------------------------

torch.set_num_threads(1)  # tiny models: threads only add overhead

HIDDEN = 64
VOCAB = 64
# the tiny BERT's and the tiny ViT's encoder: 2 layers of width HIDDEN, 4 heads, no dropout
ENCODER = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


@dataclass
class Case:
    """One row of the test matrix: a tiny base model, LoRA settings and two tasks' batches."""

    name: str
    build: Callable[[], torch.nn.Module]
    lora: dict
    make_batch: Callable[[int], dict]  # task_id -> batch (task 0 uses few distinct tokens: low-rank features)
    # PEFT's MultiheadAttention adds LoRA into its weights for every forward and subtracts it after: its base weights
    # carry float roundoff, so a model that ran forwards differs from a freshly loaded one by about this (relative)
    roundoff: float = 0.0

    def output(self, model, batch) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(**batch).logits.detach().clone()


def _tokens(task_id: int, batch: int = 2, length: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + task_id)
    low, high = (4, 12) if task_id == 0 else (20, VOCAB)
    return torch.randint(low, high, (batch, length), generator=generator)


def _seq_cls_batch(task_id: int) -> dict:
    ids = _tokens(task_id)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1]) + 2 * task_id}


def _causal_batch(task_id: int) -> dict:
    ids = _tokens(task_id)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _seq2seq_batch(task_id: int) -> dict:
    ids = _tokens(task_id)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _tokens(task_id + 7, length=3)}


def _image_batch(task_id: int) -> dict:
    generator = torch.Generator().manual_seed(200 + task_id)
    return {"pixel_values": torch.randn(1, 3, 8, 8, generator=generator), "labels": torch.tensor([task_id])}


def tiny_bert(num_labels: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=32, num_labels=num_labels, **ENCODER)
    return BertForSequenceClassification(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def tiny_vit(num_labels: int = 4) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=num_labels, **ENCODER)
    return ViTForImageClassification(config)


class TinyConvNet(nn.Module):
    """``conv_a`` (3 → 8 channels, kernel 3, padding 1), ReLU, ``conv_b`` (kernel 3, stride 2, padding 1, ``groups``),
    the mean over positions and a linear head: a classifier over 1-d signals or 2-d images."""

    def __init__(self, dims: int, groups: int = 1) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv_a = conv(3, 8, 3, padding=1)
        self.conv_b = conv(8, 8, 3, stride=2, padding=1, groups=groups)
        self.head = nn.Linear(8, 4)

    def forward(self, pixel_values, labels=None):
        hidden = self.conv_b(torch.relu(self.conv_a(pixel_values))).flatten(2).mean(-1)
        logits = self.head(hidden)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class TinyAttention(nn.Module):
    """Token embeddings, one ``nn.MultiheadAttention`` (batch first, padding masked) and a linear head on the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embed(input_ids)
        padding = None if attention_mask is None else attention_mask == 0
        logits = self.head(self.mha(hidden, hidden, hidden, key_padding_mask=padding)[0].mean(1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def tiny_convnet(dims: int, groups: int = 1) -> Callable[[], TinyConvNet]:
    def build() -> TinyConvNet:
        torch.manual_seed(0)
        return TinyConvNet(dims, groups)

    return build


def tiny_attention() -> TinyAttention:
    torch.manual_seed(0)
    return TinyAttention()


def _signal_batch(dims: int) -> Callable[[int], dict]:
    """Task 0: two signals that are constant over positions on one channel, so the patches of both convolutions span
    a few directions only (low-rank features); task 1: noise on every channel."""

    def batch(task_id: int) -> dict:
        generator = torch.Generator().manual_seed(300 + task_id)
        shape = (2, 3) + (12 if dims == 1 else 6,) * dims
        if task_id == 0:
            pixels = torch.zeros(shape)
            pixels[:, 0] = torch.randn((2,) + (1,) * dims, generator=generator) + 1.0
        else:
            pixels = torch.randn(shape, generator=generator)
        return {"pixel_values": pixels, "labels": torch.tensor([0, 1]) + 2 * task_id}

    return batch


CASES = [
    Case("bert", tiny_bert, {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}, _seq_cls_batch),
    Case(
        "gpt2",
        tiny_gpt2,
        {"task_type": "CAUSAL_LM", "target_modules": ["c_attn"], "fan_in_fan_out": True},
        _causal_batch,
    ),
    Case("llama", tiny_llama, {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}, _causal_batch),
    Case("t5", tiny_t5, {"task_type": "SEQ_2_SEQ_LM", "target_modules": ["q", "v"]}, _seq2seq_batch),
    Case("vit", tiny_vit, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"]}, _image_batch),
    # LoRA's other layer types and options (the LoRA rows of the matrix only; TRANSFORMER_CASES for the others)
    Case(
        "gpt2-embedding",  # an nn.Embedding target beside transformers' Conv1D
        tiny_gpt2,
        {"task_type": "CAUSAL_LM", "target_modules": ["wte", "c_attn"], "fan_in_fan_out": True},
        _causal_batch,
    ),
    Case(
        "bert-lora-bias",
        tiny_bert,
        {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "lora_bias": True},
        _seq_cls_batch,
    ),
    Case(
        "conv1d-lora-bias",
        tiny_convnet(1),
        {"target_modules": ["conv_a", "conv_b"], "modules_to_save": ["head"], "lora_bias": True},
        _signal_batch(1),
    ),
    Case(
        "conv2d-grouped",
        tiny_convnet(2, groups=2),
        {"target_modules": ["conv_a", "conv_b"], "modules_to_save": ["head"]},
        _signal_batch(2),
    ),
    Case("mha", tiny_attention, {"target_modules": ["mha"], "modules_to_save": ["head"]}, _seq_cls_batch, 1e-6),
    Case("bert-dora", tiny_bert, {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "use_dora": True},
         _seq_cls_batch),  # fmt: skip
]
TRANSFORMER_CASES = ("bert", "gpt2", "llama", "t5", "vit")


def train_steps(model, batch, steps: int, optimizer=None, lr: float = 1e-2) -> list[float]:
    """A plain training loop on one batch; returns the losses."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def lm_outputs_around_task2(model, old: dict, new: dict, steps: int = 10) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The exactness tests' run on a causal LM whose memory holds task 1: its logits on ``old`` before and after
    ``steps`` projected AdamW steps (weight decay 0.1) of language modelling on ``new``, and the losses."""
    model.eval()
    with torch.no_grad():
        before = model(**old).logits
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    GPProjector(model).attach(optimizer)
    losses = train_steps(model, {**new, "labels": new["input_ids"]}, steps, optimizer)
    model.eval()
    with torch.no_grad():
        after = model(**old).logits
    return before, after, losses


# ---- a smaller Llama (hidden 24) and its language-modelling batches, for the memory tests ----------------------

TINY = 1e-6  # GB: a gp_update_budget_gb that puts every unit of groups over budget, a pass each
SKETCH_ROWS = 13  # ℓ: the small Llama's task features from ``repeated`` have rank ≤ 12, so the sketch is exact


def llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def batches(task_id: int, count: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(task_id)
    ids = torch.randint(1, 64, (4 * count, 6), generator=generator)
    return [{"input_ids": ids[i : i + 4], "attention_mask": torch.ones(4, 6, dtype=torch.long)}
            for i in range(0, len(ids), 4)]  # fmt: skip


def lora_llama(dtype=torch.float32, **settings):
    settings = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False, "gp_threshold": 0.9, **settings}
    return peft_gp.get_peft_model(llama(dtype), GPLoraConfig(**settings))


def repeated(task_id: int, rows: int = 2, times: int = 3) -> list[dict]:
    """Task ``task_id``'s first ``rows`` sequences (6 tokens each) as ``times`` equal batches: rank ≤ 6·rows, yet
    more rows than the sketch's 2ℓ buffer, so that it shrinks."""
    ids = batches(task_id)[0]["input_ids"][:rows]
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}] * times


# ---- a tiny BERT's two classification tasks, and Trainer settings -----------------------------------------------

LENGTH = 6


def task_dataset(task_id: int, size: int) -> Dataset:
    """Fixed-length rows with padding at the end; task 0 draws from few tokens so its features are low-rank."""
    generator = torch.Generator().manual_seed(task_id)
    low, high = (4, 10) if task_id == 0 else (20, 60)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for index in range(size):
        length = int(torch.randint(3, LENGTH + 1, (1,), generator=generator))
        ids = torch.randint(low, high, (length,), generator=generator).tolist()
        rows["input_ids"].append(ids + [0] * (LENGTH - length))
        rows["attention_mask"].append([1] * length + [0] * (LENGTH - length))
        rows["labels"].append(2 * task_id + index % 2)
    return Dataset.from_dict(rows)


def gp_model(paradigm: str = "lora", **gp):
    settings = {"gp_threshold": 1.0, "gp_projection": "update", **gp}
    if paradigm == "adapter":
        config = GPAdapterConfig(task_type="SEQ_CLS", bottleneck_size=64, **settings)
    else:
        config = GPLoraConfig(
            task_type="SEQ_CLS", r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], **settings
        )
    return get_peft_model(tiny_bert(), config)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=6,
        learning_rate=1e-2,
        weight_decay=0.1,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def logits_on(model, dataset: Dataset) -> torch.Tensor:
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.clone()


def mean_loss(model, dataset: Dataset) -> float:
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


TASK2_STEPS = 12


def task2_args(out):
    return training_args(
        os.path.join(out, "task2"), save_strategy="steps", save_steps=1, max_steps=TASK2_STEPS, num_train_epochs=1
    )


def lora_bert(**gp):
    """The tiny BERT with GP-LoRA (rank 8) on query and value, threshold 1.0."""
    settings = {"task_type": "SEQ_CLS", "r": 8, "target_modules": ["query", "value"], "gp_threshold": 1.0, **gp}
    return get_peft_model(tiny_bert(), GPLoraConfig(**settings))


def bert_batch(task_id: int = 0, rows: int = 2):
    ids = torch.randint(4, 12, (rows, 4), generator=torch.Generator().manual_seed(task_id))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(rows) % 2}


def saved_bert(path, tasks: int = 1, seed: int = 0):
    """``lora_bert()`` after ``tasks`` tasks (2 steps and a memory update each), saved to ``path`` by peft_gp."""
    model = lora_bert()
    for task_id in range(tasks):
        train_steps(model, bert_batch(10 * seed + task_id), 2)
        peft_gp.update_memory(model, [bert_batch(10 * seed + task_id)])
    peft_gp.save_pretrained(model, path)
    return model


# ---- pushes to the fake Hub (``tests/fake_hub.py``; the ``hub_env`` and ``hub`` fixtures are in conftest.py) ----

TOKEN = "hf_test_secret_0123456789"
REPO = "user/cl-run"


def point_hub_at(monkeypatch, endpoint: str) -> None:
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


@contextmanager
def serving_fake_hub(monkeypatch, **options) -> Iterator[FakeHub]:
    """A ``FakeHub`` that takes ``TOKEN``, with ``huggingface_hub`` pointed at it; on leaving, a request that the fake
    does not implement fails the test."""
    with FakeHub(token=TOKEN, **options) as server:
        point_hub_at(monkeypatch, server.endpoint)
        yield server
    assert not server.unknown, f"requests the fake hub does not implement: {server.unknown}"


def finished_task(tmp_path, name="few tokens") -> torch.nn.Module:
    """A model with task 0 trained and stored in its memory (no push)."""
    model = gp_model()
    args = training_args(tmp_path / "train", num_train_epochs=2)
    GPTrainer(model=model, args=args, train_dataset=task_dataset(0, 8), gp_task_name=name).train()
    return model


def assert_token_hidden(error: BaseException, caplog, token: str = TOKEN) -> None:
    """Not in the message, the traceback or the logs; and no chained error (the HTTP client's errors hold the
    request, whose headers hold the token)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert token not in text and token not in caplog.text
    assert error.__cause__ is None and error.__context__ is None


def assert_saved(local_dir: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json", "gp_memory.safetensors", "gp_tasks.json"):
        assert (local_dir / name).is_file(), name


# ---- generative tasks on tiny causal LMs and T5 -----------------------------------------------------------------

PROMPT = 3  # the first PROMPT tokens of each example are the prompt: label -100, but they feed the memory too

MODELS = {
    "llama": (tiny_llama, {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}),
    "gpt2": (tiny_gpt2, {"task_type": "CAUSAL_LM", "target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "t5": (tiny_t5, {"task_type": "SEQ_2_SEQ_LM", "target_modules": ["q", "v"]}),
}


def token_ids(task_id: int, rows: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(10 * task_id + seed)
    low, high = (4, 12) if task_id == 0 else (20, VOCAB)  # task 1: few distinct tokens, low-rank features
    return torch.randint(low, high, (rows, length), generator=generator).tolist()


def lm_task(task_id: int, rows: int = 4, length: int = 6) -> Dataset:
    """Prompt + answer, tokenized, with a precomputed list ``labels`` column (-100 on the prompt)."""
    ids = token_ids(task_id, rows, length)
    labels = [[-100] * PROMPT + row[PROMPT:] for row in ids]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * rows, "labels": labels})


def seq2seq_task(task_id: int, rows: int = 4) -> Dataset:
    ids, targets = token_ids(task_id, rows, 6), token_ids(task_id, rows, 4, seed=1)
    labels = [row[:3] + [-100] if i % 2 else row for i, row in enumerate(targets)]  # some padded targets
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 6] * rows, "labels": labels})


def task_data(name: str, task_id: int) -> Dataset:
    return seq2seq_task(task_id) if name == "t5" else lm_task(task_id)


def causal_gp_model(name: str, **gp):
    build, lora = MODELS[name]
    settings = {"gp_threshold": 1.0, "gp_projection": "update", **gp}
    return get_peft_model(build(), GPLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **lora, **settings))


def outputs(model, dataset: Dataset) -> torch.Tensor:
    model.eval()
    batch = default_data_collator(list(dataset))
    with torch.no_grad():
        return model(**batch).logits.detach().clone()


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return (after - before).abs().max().item() / before.abs().max().item()


def args_for(out, cls=TrainingArguments, **overrides):
    settings = {
        "num_train_epochs": 5,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "use_cpu": True,
        **overrides,
    }
    return cls(str(out), **settings)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", unk_token="t1", eos_token="t2")


def loss_on(model, dataset: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        return model(**default_data_collator(list(dataset))).loss.item()


def assert_kept_and_learned(model, old: Dataset, before: torch.Tensor, new: Dataset, new_loss_before: float) -> None:
    assert relative_change(before, outputs(model, old)) <= 1e-4
    assert loss_on(model, new) < new_loss_before - 0.05  # the new task still learns


# ---- text classification material for the continual runner ---------------------------------------------------

CLASS_NAMES = ["apple", "bird", "car", "dune", "echo", "fern"]
WORDS_PER_CLASS = 4


def words(label: int) -> list[str]:
    return [f"{CLASS_NAMES[label]}{j}" for j in range(WORDS_PER_CLASS)]


def text_dataset(per_class_train: int = 8, per_class_test: int = 4, seed: int = 0) -> DatasetDict:
    """Each example is four words of its class, shuffled; ``label`` is a ``ClassLabel`` over ``CLASS_NAMES``."""
    rng = random.Random(seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=CLASS_NAMES)})
    splits = {}
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        texts, labels = [], []
        for label in range(len(CLASS_NAMES)):
            for _ in range(count):
                texts.append(" ".join(rng.choices(words(label), k=4)))
                labels.append(label)
        splits[split] = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return DatasetDict(splits)


def save_tiny_text_model(folder: Path, arch: str = "bert") -> Path:
    """A 2-layer BERT (or, ``arch="llama"``, a 2-layer Llama decoder; hidden 32) and a word-level tokenizer over the
    dataset's words, saved to ``folder``."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])}
    for label in range(len(CLASS_NAMES)):
        for word in words(label):
            vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    if arch == "llama":  # pads with [PAD]; the sequence-classification head reads the last non-pad token
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             pad_token_id=vocab["[PAD]"], initializer_range=0.2)  # fmt: skip
        model = LlamaModel(config)
    else:
        model = BertModel(BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            initializer_range=0.2,  # random features that differ between inputs (0.02: constant pooled output)
        ))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


SILENT = dict(say=lambda *_: None)  # run_sequence(config, **SILENT) prints nothing


def tiny_run_config(tiny_dirs: Path, tmp_path: Path, **changes) -> RunConfig:
    """A ``run_sequence`` config over the ``tiny_dirs`` fixture's model and data (three tasks of two classes, every
    example), writing under ``tmp_path``; ``changes`` override any field."""
    values = dict(
        name="tiny",
        model=str(tiny_dirs / "model"),
        dataset=str(tiny_dirs / "data"),
        classes_per_task=[2, 2, 2],
        train_per_class=None,
        test_per_class=None,
        max_length=8,
        epochs=10,
        batch_size=8,
        learning_rate=5e-2,
        gp_memory_samples=32,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    return RunConfig(**{**values, **changes})


def save_legacy_memory(memory, path, version: int) -> None:
    """Write ``memory`` as peft_gp wrote it before format 3: one basis per group (shared ones repeated), the SGP
    importances beside them from version 2, no ``gp_shared``."""
    tensors = {name: basis.detach().cpu().float().contiguous().clone() for name, basis in memory.bases.items()}
    if version >= 2:
        tensors.update({name + IMPORTANCE_SUFFIX: value.clone() for name, value in memory.importances.items()})
    metadata = {key: value for key, value in memory.metadata().items() if key not in ("gp_shared", "gp_complements")}
    save_file(tensors, str(path), metadata={**metadata, "gp_format_version": str(version)})


def run_two_ranks(script: Path, output: Path) -> None:
    """``script output`` under ``torch.distributed.run`` on 2 CPU processes (gloo); fails with the output's tail."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), str(output)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def one_process_memory(model: nn.Module, dataset: Dataset) -> GPMemory:
    """The memory one process grows at threshold 1.0 from ``dataset`` as one batch: the reference that a distributed
    run's bases must span."""
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    grams, seen = collect_grams(model, resolve_groups(model), [batch])
    assert seen == len(dataset)
    reference = GPMemory(dims={name: gram.shape[0] for name, gram in grams.items()})
    reference.update(grams, 1.0)
    return reference

"""Tiny, download-free material for the continual-learning tests: a saved tiny BERT with a word-level tokenizer, and
a labelled text dataset whose classes are told apart by their own words (learnable in a few steps)."""

from __future__ import annotations

import random
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

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
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

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

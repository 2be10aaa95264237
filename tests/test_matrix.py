"""The test matrix: every tiny model × every paradigm (GP config), checking the invariants of DESIGN.md §3."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_gp
from peft_gp import GPAdapterConfig, GPLoraConfig, GPPrefixTuningConfig, GPProjector, GPPromptTuningConfig
from peft_gp.core import maths
from peft_gp.wiring.grams import collect_grams
from peft_gp.wiring.state import resolve_groups

from .testing import CASES, TRANSFORMER_CASES, train_steps


def _adapter(**settings):
    def config(case, **gp):
        shared = {key: case.lora[key] for key in ("task_type", "modules_to_save") if key in case.lora}
        return GPAdapterConfig(bottleneck_size=16, **settings, **shared, **gp)

    return config


def _prompt_learning(config_class, tokens: int, **settings):
    def config(case, **gp):
        task_type = case.lora.get("task_type", "SEQ_CLS")
        return config_class(task_type=task_type, num_virtual_tokens=tokens, **settings, **gp)

    return config


@dataclass(frozen=True)
class Paradigm:
    """One row family of the matrix: a GP config per case, and which invariants hold for it."""

    config: Callable
    suffixes: tuple[str, ...]  # of the projected groups it must produce
    cases: tuple[str, ...] | None = None  # the models it supports (None: all)
    exact: bool = True  # old outputs kept exactly at threshold 1.0 with "update" projection
    input_features: bool = True  # every group reads a module's input (else queries, prompts: tested elsewhere)
    plain_peft: tuple[str, ...] | None = None  # models on which plain PEFT loads it for inference (None: all)
    lr: float = 1e-2  # AdamW's learning rate in the two-task runs
    min_fall: float | None = 0.1  # share by which task 2's loss must fall with projection (None: see below)
    # with min_fall None: task 2's loss must fall by at least this share of what it falls by without projection
    min_share_of_plain: float = 0.1
    first_task_examples: int | None = None  # cut task 1's batch (low-rank features leave room to learn)


PARADIGMS = {
    "lora": Paradigm(
        lambda case, **gp: GPLoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, **case.lora, **gp), ("lora_A", "lora_B")
    ),
    "adapter": Paradigm(
        _adapter(adapter_style="parallel"), ("gp_adapter_down", "gp_adapter_up"), cases=TRANSFORMER_CASES
    ),
    # sequential, without biases: the tiny models' FFN outputs are ~0.01 in scale, so with biases the bottleneck
    # activations are almost the same vector for every token and protecting task 1 leaves little to learn with;
    # scaling 4 lets the 15 steps of task 2 move the loss (with or without projection alike)
    "adapter-seq": Paradigm(
        _adapter(adapter_style="sequential", adapter_bias=False, activation="gelu", scaling=4.0),
        ("gp_adapter_down", "gp_adapter_up"),
        cases=TRANSFORMER_CASES,
    ),
    # keys and values protected, one basis per head: exact (keys alone keep only the scores, see test_prefix_prompt)
    "prefix": Paradigm(
        # 12 virtual tokens: task 1's 8 queries per head leave room in the 12-dim space of the value prefix
        _prompt_learning(GPPrefixTuningConfig, tokens=12, gp_protect_values=True),
        ("key_prefix.head0", "value_prefix.head0"),
        cases=("bert", "gpt2", "llama", "vit"),
        input_features=False,
        plain_peft=("gpt2", "llama"),  # PEFT's own prefix route fails on BERT and never reaches ViT
        lr=3e-2,
        min_fall=None,  # a prefix learns slowly on the tiny random models: judged against the unprotected run
        first_task_examples=1,  # Llama's grouped heads read each key head with two query heads: fewer queries
    ),
    # the paper's condition (old tokens and prompt rows) is exact, the model's outputs are not: see test_prefix_prompt
    "prompt": Paradigm(
        _prompt_learning(GPPromptTuningConfig, tokens=8),
        ("prompt_encoder.embedding",),
        cases=("bert", "gpt2", "llama"),
        exact=False,
        input_features=False,
    ),
}


def rows(**needs: bool) -> list:
    """``(case, paradigm)`` pairs of the matrix whose paradigm supports the case and has the ``needs`` properties."""
    return [
        pytest.param(case, name, id=f"{case.name}-{name}")
        for name, paradigm in PARADIGMS.items()
        for case in CASES
        if (paradigm.cases is None or case.name in paradigm.cases)
        and all(getattr(paradigm, key) == value for key, value in needs.items())
    ]


def first_task_batch(case, paradigm) -> dict:
    batch, examples = case.make_batch(0), PARADIGMS[paradigm].first_task_examples
    return batch if examples is None else {key: value[:examples] for key, value in batch.items()}


def make_model(case, paradigm, **gp):
    return peft_gp.get_peft_model(case.build(), PARADIGMS[paradigm].config(case, **gp))


@pytest.mark.parametrize("case, paradigm", rows())
def test_every_trainable_parameter_is_protected(case, paradigm):
    model = make_model(case, paradigm)
    groups = resolve_groups(model)
    covered = {id(p) for group in groups for p in group.parameters}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(id(p) in covered for _, p in model.named_parameters() if p.requires_grad), trainable
    for suffix in PARADIGMS[paradigm].suffixes:
        assert any(group.name.endswith(suffix) for group in groups), suffix


@pytest.mark.parametrize("case, paradigm", rows())
def test_memory_bases_are_orthonormal_capture_threshold_and_do_not_regrow(case, paradigm):
    model = make_model(case, paradigm, gp_threshold=0.9)
    batch = case.make_batch(0)
    train_steps(model, batch, 3)
    report = peft_gp.update_memory(model, [batch])
    memory = peft_gp.get_memory(model)
    assert memory.tasks_seen == 1 and memory.thresholds == [0.9]
    groups = resolve_groups(model)
    grams, seen = collect_grams(model, groups, [batch])
    assert seen == batch[next(iter(batch))].shape[0]
    fixed = {group.name for group in groups if group.frozen}  # kept fixed from task 2 on (DoRA's magnitude): no basis
    for name, basis in memory.bases.items():
        assert basis.dtype == torch.float32 and basis.shape[1] == report[name]["basis_size"]
        assert basis.shape[1] > 0 or name in fixed, name
        assert maths.orthonormality_error(basis) < 1e-5
        assert maths.captured_energy(grams[name], basis) >= 0.9 - 1e-5
    # the same task stored again adds nothing
    sizes = {name: basis.shape[1] for name, basis in memory.bases.items()}
    peft_gp.update_memory(model, [batch])
    assert {name: basis.shape[1] for name, basis in memory.bases.items()} == sizes


def run_two_tasks(case, paradigm, projected: bool, mode: str = "update", steps: int = 15):
    """Task 1, memory (threshold 1.0), then task 2 with AdamW + weight decay; returns the evidence."""
    model = make_model(case, paradigm, gp_threshold=1.0, gp_projection=mode)
    old_batch, new_batch = first_task_batch(case, paradigm), case.make_batch(1)
    lr = PARADIGMS[paradigm].lr
    train_steps(model, old_batch, 10, lr=lr)
    peft_gp.update_memory(model, [old_batch])
    before = case.output(model, old_batch)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    projector = GPProjector(model).attach(optimizer) if projected else None
    losses = train_steps(model, new_batch, steps, optimizer=optimizer)
    if projector:
        projector.detach()
    after = case.output(model, old_batch)
    moved = max(
        (p.detach() - weights_before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad
    )
    return model, before, after, losses, moved


@pytest.mark.parametrize("case, paradigm", rows(exact=True))
def test_update_mode_keeps_old_outputs_exactly_and_still_learns(case, paradigm):
    _, before, after, losses, moved = run_two_tasks(case, paradigm, projected=True)
    scale = before.abs().max().item()
    assert (after - before).abs().max().item() <= 1e-4 * scale
    assert moved > 1e-3, "the adapter did not train at all: the test would prove nothing"
    row = PARADIGMS[paradigm]
    if row.min_fall is not None:
        assert losses[-1] < (1 - row.min_fall) * losses[0], losses
    else:
        plain_losses = run_two_tasks(case, paradigm, projected=False)[3]
        gained, plain_gained = losses[0] - losses[-1], plain_losses[0] - plain_losses[-1]
        assert gained > row.min_share_of_plain * plain_gained > 0, (gained, plain_gained)


@pytest.mark.parametrize("case, paradigm", rows())
def test_without_projection_old_outputs_drift(case, paradigm):
    _, before, after, _, _ = run_two_tasks(case, paradigm, projected=False)
    assert (after - before).abs().max().item() > 1e-2 * before.abs().max().item()


@pytest.mark.parametrize("case, paradigm", rows())
def test_gradient_mode_projects_each_gradient(case, paradigm):
    model = make_model(case, paradigm, gp_threshold=1.0, gp_projection="gradient")
    old_batch = first_task_batch(case, paradigm)
    train_steps(model, old_batch, 3)
    peft_gp.update_memory(model, [old_batch])
    projector = GPProjector(model)
    model.train()
    model(**case.make_batch(1)).loss.backward()

    def joined_grad(group):  # the group's block of the gradient, feature axis last, bias on a constant-1 column
        if group.bias is None:
            return group.view(group.weight.grad).clone()
        return torch.cat([group.view(group.weight.grad), group.bias_view(group.bias.grad).unsqueeze(-1)], dim=-1)

    raw = [joined_grad(group) for group in projector.groups]
    projector.project_gradients()
    memory = peft_gp.get_memory(model)
    for group, before in zip(projector.groups, raw):
        if group.frozen:
            assert not joined_grad(group).any(), group.name
            continue
        after, basis = joined_grad(group), memory.bases[group.name]
        assert (after @ basis).abs().max().item() <= 1e-5 * before.abs().max().item()
        torch.testing.assert_close(after, maths.project_out(before, basis))
    assert projector.pop_stats()["gp_grad_removed"] > 0.0


@pytest.mark.parametrize("case, paradigm", rows(exact=True))
def test_gradient_mode_is_exact_with_plain_sgd(case, paradigm):
    """With SGD (no moments, no decay) projecting gradients alone is exact: the paper's setting."""
    model = make_model(case, paradigm, gp_threshold=1.0, gp_projection="gradient")
    old_batch = first_task_batch(case, paradigm)
    train_steps(model, old_batch, 10)
    peft_gp.update_memory(model, [old_batch])
    before = case.output(model, old_batch)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    GPProjector(model).attach(optimizer)
    train_steps(model, case.make_batch(1), 10, optimizer=optimizer)
    after = case.output(model, old_batch)
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()


@pytest.mark.parametrize("case, paradigm", rows())
def test_save_and_reload_restores_weights_and_bases_bit_identically(case, paradigm, tmp_path):
    bounds = {"gp_update_budget_gb": 2.5, "gp_max_basis_rank": {".": 100_000},  # above every d: saved, no effect
              "gp_sketch_above": 16, "gp_sketch_rows": 8,  # inputs wider than 16 sketched
              "gp_gram_dtype": "float32"}
    model = make_model(case, paradigm, gp_threshold=0.95, **bounds)
    batch = case.make_batch(0)
    train_steps(model, batch, 3)
    peft_gp.update_memory(model, [batch])
    peft_gp.save_pretrained(model, tmp_path)
    assert (tmp_path / "gp_memory.safetensors").is_file() and (tmp_path / "adapter_model.safetensors").is_file()

    loaded = peft_gp.from_pretrained(case.build(), str(tmp_path), is_trainable=True)
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    assert loaded.peft_config["default"].gp_threshold == 0.95
    assert {key: getattr(loaded.peft_config["default"], key) for key in bounds} == bounds
    saved, restored = peft_gp.get_memory(model), peft_gp.get_memory(loaded)
    assert saved.thresholds == restored.thresholds
    assert set(saved.bases) == set(restored.bases)
    for name in saved.bases:
        assert torch.equal(saved.bases[name], restored.bases[name])
    original = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, original[name]), name
    atol = case.roundoff * case.output(model, batch).abs().max().item()
    torch.testing.assert_close(case.output(loaded, batch), case.output(model, batch), rtol=0, atol=atol)

    # PeftModel.from_pretrained loads the adapter for inference too (PEFT's own types: plain PEFT, warning about the
    # gp_* keys; the bottleneck adapter exists in PEFT only once peft_gp is imported, see test_adapter.py)
    supported = PARADIGMS[paradigm].plain_peft
    if supported is not None and case.name not in supported:
        return
    if paradigm.startswith("adapter"):
        plain = PeftModel.from_pretrained(case.build(), str(tmp_path))
    else:
        with pytest.warns(UserWarning, match="gp_"):
            plain = PeftModel.from_pretrained(case.build(), str(tmp_path))
    torch.testing.assert_close(case.output(plain, batch), case.output(model, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case, paradigm", rows(exact=True))
def test_reloaded_model_continues_with_projection(case, paradigm, tmp_path):
    model, before, _, _, _ = run_two_tasks(case, paradigm, projected=True, steps=1)
    peft_gp.save_pretrained(model, tmp_path)
    loaded = peft_gp.from_pretrained(case.build(), str(tmp_path), is_trainable=True)
    old_batch = first_task_batch(case, paradigm)
    reference = case.output(loaded, old_batch)
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    GPProjector(loaded).attach(optimizer)
    train_steps(loaded, case.make_batch(1), 5, optimizer=optimizer)
    assert (case.output(loaded, old_batch) - reference).abs().max().item() <= 1e-4 * reference.abs().max().item()


@pytest.mark.parametrize("case, paradigm", rows(input_features=True))
def test_collected_grams_equal_the_grams_of_the_layer_inputs(case, paradigm):
    """The hooks' Gram matrices are exactly XᵀX of what each LoRA factor reads (shared inputs computed once)."""
    model = make_model(case, paradigm)
    batch = case.make_batch(0)
    groups = [group for group in resolve_groups(model) if group.feature_module is not None]  # no fixed groups
    seen: dict[str, list[torch.Tensor]] = {group.name: [] for group in groups}
    handles = [
        group.feature_module.register_forward_hook(
            lambda module, args, output, name=group.name: seen[name].append(args[0].detach().clone())
        )
        for group in groups
    ]
    case.output(model, batch)
    for handle in handles:
        handle.remove()
    grams, _ = collect_grams(model, groups, [batch])
    for group in groups:
        features = torch.cat([group.features(x) for x in seen[group.name]])
        torch.testing.assert_close(grams[group.name], maths.feature_gram(features), rtol=1e-12, atol=1e-12)


def test_padding_tokens_do_not_enter_the_memory():
    from .testing import CASES

    bert = next(case for case in CASES if case.name == "bert")
    model = make_model(bert, "lora")
    groups = [group for group in resolve_groups(model) if group.name.endswith("layer.0.attention.self.query.lora_A")]
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]])
    mask = (ids != 0).long()
    inputs = []
    handle = groups[0].feature_module.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    bert.output(model, {"input_ids": ids, "attention_mask": mask})
    handle.remove()
    grams, _ = collect_grams(model, groups, [{"input_ids": ids, "attention_mask": mask}])
    expected = maths.feature_gram(inputs[0][mask.bool()])
    torch.testing.assert_close(grams[groups[0].name], expected, rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(grams[groups[0].name]).item() == 5  # 5 real tokens, not 10 positions


@pytest.mark.filterwarnings("ignore:The memory now fills")  # LoRA's r-dim spaces fill on purpose (threshold 1)
@pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # GPT-2's Conv1D
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_classifier_head_memory_holds_only_the_pooled_positions(arch):
    """A decoder classifier scores every position but keeps the last non-pad one: only that row enters the head's
    memory (all tokens would fill it and freeze the head), and projecting against it still keeps old outputs."""
    from transformers import GPT2ForSequenceClassification, LlamaForSequenceClassification

    from .testing import tiny_gpt2, tiny_llama

    build, classifier, targets = {
        "llama": (tiny_llama, LlamaForSequenceClassification, ["q_proj", "v_proj"]),
        "gpt2": (tiny_gpt2, GPT2ForSequenceClassification, ["c_attn"]),
    }[arch]
    config = build().config
    config.num_labels, config.pad_token_id = 4, 0
    torch.manual_seed(0)
    model = get_peft_model(
        classifier(config), GPLoraConfig(task_type="SEQ_CLS", target_modules=targets, gp_threshold=1.0)
    )
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [0, 0, 10, 11, 12], [13, 14, 15, 16, 17]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 1, 0, 1])}
    head = next(group for group in resolve_groups(model) if group.name == "score")
    inputs = []
    copy = model.base_model.model.score.modules_to_save["default"]
    handle = copy.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        model(**batch)
    handle.remove()
    grams, _ = collect_grams(model, [head], [batch])
    pooled = inputs[0][torch.arange(4), torch.tensor([2, 1, 4, 4])]
    torch.testing.assert_close(grams["score"], maths.feature_gram(head.features(pooled)), rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(grams["score"]).item() == 4  # 4 examples, not 14 real tokens

    train_steps(model, batch, 5)
    peft_gp.update_memory(model, [batch])
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits.clone()
    weight = copy.weight.detach().clone()
    new_ids = torch.randint(20, 60, (4, 5), generator=torch.Generator().manual_seed(1))
    new = {"input_ids": new_ids, "attention_mask": torch.ones_like(new_ids), "labels": torch.tensor([2, 3, 2, 3])}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    GPProjector(model).attach(optimizer)
    train_steps(model, new, 10, optimizer=optimizer)
    model.eval()
    with torch.no_grad():
        after = model(**batch).logits
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()
    assert (copy.weight.detach() - weight).abs().max().item() > 1e-3, "the head did not train: the test proves nothing"

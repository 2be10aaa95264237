"""Prefix and prompt tuning beyond the matrix's invariants (``tests/test_matrix.py`` has their rows): what each
condition keeps, the prefix route against PEFT's own, refusals and the memory's features, on tiny models."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_gp
from peft_gp import GPPrefixTuningConfig, GPProjector, GPPromptTuningConfig
from peft_gp.wiring.attention import register_capture
from peft_gp.wiring.state import get_state, resolve_groups

from .testing import VOCAB, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit, train_steps

PREFIX_TOKENS = 12


def _text_batch(task_id: int, task_type: str) -> dict:
    # task 0: one short sequence of few distinct tokens, so that its queries span few dimensions of each head
    generator = torch.Generator().manual_seed(300 + task_id)
    shape, (low, high) = ((1, 4), (4, 12)) if task_id == 0 else ((4, 6), (20, VOCAB))
    ids = torch.randint(low, high, shape, generator=generator)
    labels = ids.clone() if task_type == "CAUSAL_LM" else torch.arange(shape[0]) % 2 + 2 * task_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _image_batch(task_id: int, task_type: str) -> dict:
    generator = torch.Generator().manual_seed(400 + task_id)
    size = 1 if task_id == 0 else 4
    return {"pixel_values": torch.randn(size, 3, 8, 8, generator=generator), "labels": torch.arange(size) % 4}


PREFIX_CASES = {
    "bert": (tiny_bert, "SEQ_CLS", _text_batch),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", _text_batch),
    "llama": (tiny_llama, "CAUSAL_LM", _text_batch),
    "llama_seq_cls": (lambda: _llama_classifier(), "SEQ_CLS", _text_batch),
    "vit": (tiny_vit, "SEQ_CLS", _image_batch),
}
PROMPT_CASES = {name: PREFIX_CASES[name] for name in ("bert", "gpt2", "llama")}


def _llama_classifier():
    from transformers import LlamaForSequenceClassification

    config = tiny_llama().config
    config.num_labels, config.pad_token_id = 4, 0
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.detach().clone()


def _two_tasks(model, make_batch, task_type, projected: bool, steps: int = 15, lr: float = 3e-2):
    """Task 1, its memory, then task 2 with AdamW + weight decay; returns old outputs before/after and the losses."""
    old, new = make_batch(0, task_type), make_batch(1, task_type)
    train_steps(model, old, 5, lr=lr)
    peft_gp.update_memory(model, [old])
    before = _logits(model, old)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    projector = GPProjector(model).attach(optimizer) if projected else None
    losses = train_steps(model, new, steps, optimizer=optimizer)
    if projector:
        projector.detach()
    return before, _logits(model, old), losses


def _prefix_model(name, **gp):
    build, task_type, make_batch = PREFIX_CASES[name]
    config = GPPrefixTuningConfig(task_type=task_type, num_virtual_tokens=PREFIX_TOKENS, gp_threshold=1.0, **gp)
    return peft_gp.get_peft_model(build(), config), task_type, make_batch


# ---- prefix tuning ---------------------------------------------------------------------------------------------


def _scores_on_prefix(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """First layer's raw scores q·P_K of the batch's queries on the prefix, per head, and its attention weights."""
    module = get_state(model).route.forwards["default"].args[1][0]
    config = model.peft_config["default"]
    seen = {}
    handle = register_capture(module, lambda queries, weights: seen.update(q=queries, w=weights))
    _logits(model, batch)
    handle.remove()
    head_dim = config.token_dim // config.num_attention_heads
    keys = model.prompt_encoder["default"].embedding.weight.detach()[:, : config.token_dim]
    keys = keys.view(config.num_virtual_tokens, config.num_attention_heads, head_dim).transpose(0, 1)
    scores = seen["q"] @ keys.repeat_interleave(seen["q"].shape[1] // keys.shape[0], 0).transpose(-1, -2)
    return scores, seen["w"]


@pytest.mark.parametrize("per_head", [True, False])
def test_prefix_key_protection_keeps_the_old_scores_on_the_prefix(per_head):
    """Per head: every old score on the prefix is kept. One basis over all heads: only their sum over heads."""
    model, task_type, make_batch = _prefix_model("bert", gp_per_head=per_head, gp_protect_values=False)
    old = make_batch(0, task_type)
    train_steps(model, old, 5, lr=3e-2)
    peft_gp.update_memory(model, [old])
    scores, weights = _scores_on_prefix(model, old)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.1)
    GPProjector(model).attach(optimizer)
    train_steps(model, make_batch(1, task_type), 10, optimizer=optimizer)
    new_scores, new_weights = _scores_on_prefix(model, old)
    scale = scores.abs().max().item()
    summed = (new_scores.sum(1) - scores.sum(1)).abs().max().item()
    assert summed <= 1e-4 * scale
    if per_head:
        assert (new_scores - scores).abs().max().item() <= 1e-4 * scale
        assert (new_weights - weights).abs().max().item() <= 1e-5
    else:
        assert (new_scores - scores).abs().max().item() > 1e-3 * scale
    assert {group.name.split(".")[-1] for group in resolve_groups(model)} >= (
        {"head0", "head3"} if per_head else {"key_prefix"}
    )


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prefix_outputs_equal_plain_peft_prefix_tuning(name, tmp_path):
    """The saved adapter is PEFT's own: PEFT's cache route gives the same outputs as peft_gp's attention route."""
    model, task_type, make_batch = _prefix_model(name)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()
    batch = make_batch(1, task_type)
    peft_gp.save_pretrained(model, tmp_path)
    with pytest.warns(UserWarning, match="gp_"):
        plain = PeftModel.from_pretrained(PREFIX_CASES[name][0](), str(tmp_path))
    torch.testing.assert_close(_logits(plain, batch), _logits(model, batch), rtol=1e-5, atol=1e-6)
    with model.disable_adapter():
        base = _logits(model, batch)
    assert (base - _logits(model, batch)).abs().max().item() > 1e-3  # the prefix does act
    # generation goes through PEFT's own cache route, which the attention function leaves alone
    ids = batch["input_ids"][:1]
    settings = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 4, "do_sample": False}
    assert torch.equal(model.generate(input_ids=ids, **settings), plain.generate(input_ids=ids, **settings))


def test_prefix_refusals_are_clear():
    with pytest.raises(ValueError, match="prefix_projection"):
        GPPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True)
    with pytest.raises(ValueError, match="task_type"):
        GPPrefixTuningConfig(num_virtual_tokens=4)
    with pytest.raises(TypeError, match="gp_per_head"):
        GPPrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, gp_per_head="yes")
    with pytest.raises(ValueError, match="gp_protect_values=True needs gp_per_head=True"):
        GPPrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, gp_per_head=False, gp_protect_values=True)
    with pytest.raises(ValueError, match="gp_protect_values=False for the keys-only setting"):
        GPPrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, gp_per_head=False)  # values: True by default
    assert GPPrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4).gp_protect_values is True
    t5 = get_peft_model(tiny_t5(), GPPrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        resolve_groups(t5)
    with pytest.raises(NotImplementedError, match="encoder-decoder") as refused:  # peft_gp's build refuses it at once
        peft_gp.get_peft_model(tiny_t5(), GPPrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    assert "GPPromptTuningConfig" not in str(refused.value)  # it refuses encoder-decoders too: not a way out
    assert "GPAdapterConfig" in str(refused.value)


# ---- prompt tuning ---------------------------------------------------------------------------------------------


def _prompt_model(name, tokens: int = PREFIX_TOKENS, **gp):
    build, task_type, make_batch = PROMPT_CASES[name]
    settings = {"gp_threshold": 1.0, **gp}
    config = GPPromptTuningConfig(task_type=task_type, num_virtual_tokens=tokens, **settings)
    return peft_gp.get_peft_model(build(), config), task_type, make_batch


def _first_layer_prompt_logits(model, batch) -> torch.Tensor:
    """The first attention layer's logits from the batch's tokens (queries) to the prompt (keys), all heads."""
    base = model.get_base_model()
    module = next(m for m in base.modules() if hasattr(m, "is_causal") and hasattr(m, "scaling"))
    seen = {}
    from transformers import AttentionInterface

    original = AttentionInterface._global_mapping["sdpa"]

    def capturing(mod, query, key, value, mask, **kwargs):
        if mod is module and "scores" not in seen:
            seen["scores"] = query @ key.repeat_interleave(query.shape[1] // key.shape[1], 1).transpose(-1, -2)
        return original(mod, query, key, value, mask, **kwargs)

    AttentionInterface._global_mapping["sdpa"] = capturing
    try:
        _logits(model, batch)
    finally:
        AttentionInterface._global_mapping["sdpa"] = original
    m = model.peft_config["default"].num_virtual_tokens
    return seen["scores"][:, :, m:, :m]


@pytest.mark.parametrize("name", list(PROMPT_CASES))
def test_prompt_keeps_old_token_and_prompt_inner_products_and_learns(name):
    model, task_type, make_batch = _prompt_model(name)
    prompt = model.prompt_encoder["default"].embedding.weight
    old = make_batch(0, task_type)
    train_steps(model, old, 5, lr=3e-2)
    peft_gp.update_memory(model, [old])
    tokens = model.word_embeddings(old["input_ids"]).detach().reshape(-1, prompt.shape[1])
    prompt_before = prompt.detach().clone()
    logits_before = _first_layer_prompt_logits(model, old)
    before = _logits(model, old)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.1)
    GPProjector(model).attach(optimizer)
    losses = train_steps(model, make_batch(1, task_type), 15, optimizer=optimizer)
    change = prompt.detach() - prompt_before
    assert change.abs().max().item() > 1e-2, "the prompt did not train: the test proves nothing"
    # the paper's condition, exact: x Δpᵀ = 0 for old token embeddings x and p_old Δpᵀ = 0
    assert (tokens @ change.T).abs().max().item() <= 1e-5 * tokens.norm(dim=1).max() * change.norm(dim=1).max()
    assert (prompt_before @ change.T).abs().max().item() <= 1e-5 * prompt_before.norm() * change.norm()
    assert losses[-1] < losses[0], losses
    # what the model actually computes moves a little: normalisation and W_Q W_Kᵀ sit between p and the logits
    logits_drift = (_first_layer_prompt_logits(model, old) - logits_before).abs().max().item()
    output_drift = (_logits(model, old) - before).abs().max().item()

    plain, _, _ = _prompt_model(name)
    train_steps(plain, old, 5, lr=3e-2)
    peft_gp.update_memory(plain, [old])
    plain_logits_before, plain_before = _first_layer_prompt_logits(plain, old), _logits(plain, old)
    train_steps(plain, make_batch(1, task_type), 15, lr=3e-2)
    plain_logits_drift = (_first_layer_prompt_logits(plain, old) - plain_logits_before).abs().max().item()
    plain_output_drift = (_logits(plain, old) - plain_before).abs().max().item()
    print(
        f"{name}: first-layer old-token→prompt logit drift {logits_drift:.2e} with GP, {plain_logits_drift:.2e} "
        f"without; output drift {output_drift:.2e} with GP, {plain_output_drift:.2e} without"
    )
    assert logits_drift < plain_logits_drift


def test_prompt_round_trip_and_from_pretrained_is_trainable(tmp_path):
    model, task_type, make_batch = _prompt_model("bert", tokens=4)
    old = make_batch(0, task_type)
    train_steps(model, old, 3)
    peft_gp.update_memory(model, [old])
    peft_gp.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="trainable"):  # what PEFT itself does
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path), is_trainable=True)
    loaded = peft_gp.from_pretrained(tiny_bert(), str(tmp_path), is_trainable=True)
    assert isinstance(loaded.peft_config["default"], GPPromptTuningConfig)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "prompt_encoder.default.embedding.weight" in trainable
    saved, restored = peft_gp.get_memory(model), peft_gp.get_memory(loaded)
    assert saved.thresholds == restored.thresholds
    assert all(torch.equal(saved.bases[n], restored.bases[n]) for n in saved.bases)
    torch.testing.assert_close(_logits(loaded, old), _logits(model, old), rtol=0, atol=0)
    prompt = loaded.prompt_encoder["default"].embedding.weight
    start = prompt.detach().clone()
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=3e-2)
    GPProjector(loaded).attach(optimizer)
    train_steps(loaded, make_batch(1, task_type), 5, optimizer=optimizer)
    change = prompt.detach() - start
    basis = restored.bases["prompt_encoder.embedding"]
    assert change.abs().max().item() > 1e-3
    assert (change @ basis).abs().max().item() <= 1e-5 * change.abs().max().item()


def test_prompt_refusals_are_clear():
    with pytest.raises(ValueError, match="task_type"):
        GPPromptTuningConfig(num_virtual_tokens=4)
    t5 = get_peft_model(tiny_t5(), GPPromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        resolve_groups(t5)
    # a ViT is no longer refused: see test_vision_prompt.py


@pytest.mark.parametrize("paradigm", ["prefix", "prompt"])
def test_gp_trainer_runs_two_tasks_of_prompt_learning(paradigm, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    if paradigm == "prefix":
        model, task_type, make_batch = _prefix_model("bert", gp_protect_values=True)
    else:
        model, task_type, make_batch = _prompt_model("bert")
    args = TrainingArguments(
        str(tmp_path),
        max_steps=4,
        learning_rate=3e-2,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    old = make_batch(0, task_type)
    datasets = [Dataset.from_dict({k: v.tolist() for k, v in make_batch(t, task_type).items()}) for t in (0, 1)]
    peft_gp.GPTrainer(model=model, args=args, train_dataset=datasets[0]).train()
    before = _logits(model, old)
    trainer = peft_gp.GPTrainer(model=model, args=args, train_dataset=datasets[1])
    trainer.train()
    assert trainer.gp_memory.tasks_seen == 2
    drift = (_logits(model, old) - before).abs().max().item()
    if paradigm == "prefix":  # keys and values protected: exact
        assert drift <= 1e-4 * before.abs().max().item()


# ---- the wiring: blocks of one parameter, captured features, padding ---------------------------------------------


@pytest.mark.parametrize("values", [False, True])
def test_prefix_gradient_projection_acts_on_each_block_only(values):
    from peft_gp.core import maths

    model, task_type, make_batch = _prefix_model("llama", gp_projection="gradient", gp_protect_values=values)
    old = make_batch(0, task_type)
    train_steps(model, old, 3)
    peft_gp.update_memory(model, [old])
    projector = GPProjector(model)
    model.train()
    model(**make_batch(1, task_type)).loss.backward()
    weight = model.prompt_encoder["default"].embedding.weight
    raw = weight.grad.clone()
    projector.project_gradients()
    memory = peft_gp.get_memory(model)
    owned = torch.zeros_like(weight, dtype=torch.bool)
    for group in projector.groups:
        if group.weight is not weight:
            continue
        basis = memory.bases[group.name]
        expected = maths.project_out(group.view(raw), basis)
        torch.testing.assert_close(group.view(weight.grad), expected, rtol=1e-5, atol=1e-7)
        assert (group.view(weight.grad) @ basis).abs().max().item() <= 1e-5 * raw.abs().max().item()
        group.view(owned).fill_(True)
    assert torch.equal(weight.grad[~owned], raw[~owned])  # value prefixes are left alone unless protected
    assert owned.all().item() == values


def test_prefix_memory_grams_are_those_of_the_real_queries_without_padding():
    from peft_gp.core import maths
    from peft_gp.wiring.grams import collect_grams

    model, _, _ = _prefix_model("bert", gp_protect_values=True)
    groups = resolve_groups(model)
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 0]])
    mask = (ids != 0).long()
    padded, _ = collect_grams(model, groups, [{"input_ids": ids, "attention_mask": mask}])
    separate, _ = collect_grams(
        model, groups, [{"input_ids": ids[i : i + 1, : int(mask[i].sum())]} for i in range(ids.shape[0])]
    )
    for name in padded:
        torch.testing.assert_close(padded[name], separate[name], rtol=1e-4, atol=1e-6)  # float32 attention

    # key groups: the Gram is QᵀQ of the first layer's per-head queries (real tokens only)
    seen = {}
    module = get_state(model).route.forwards["default"].args[1][0]
    handle = register_capture(module, lambda queries, weights: seen.update(q=queries, w=weights))
    _logits(model, {"input_ids": ids, "attention_mask": mask})
    handle.remove()
    head = next(g for g in groups if g.name.endswith("layer.0.attention.self.key_prefix.head2"))
    torch.testing.assert_close(padded[head.name], maths.feature_gram(seen["q"][:, 2][mask.bool()]))
    weights = seen["w"][:, 1][mask.bool()]
    assert torch.all(weights.sum(-1) < 1) and torch.all(weights > 0)  # softmax shares on the prefix columns
    value = next(g for g in groups if g.name.endswith("layer.0.attention.self.value_prefix.head1"))
    torch.testing.assert_close(padded[value.name], maths.feature_gram(weights))


def test_prompt_memory_keeps_token_embeddings_and_prompt_rows_apart():
    from peft_gp.core import maths
    from peft_gp.wiring.grams import collect_grams

    model, _, _ = _prompt_model("gpt2", tokens=4)
    groups = resolve_groups(model)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    exact = {}
    grams, _ = collect_grams(model, groups, [{"input_ids": ids, "attention_mask": mask}], exact_grams=exact)
    tokens = model.word_embeddings(ids[mask.bool()]).detach()
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    torch.testing.assert_close(grams["prompt_encoder.embedding"], maths.feature_gram(tokens))
    torch.testing.assert_close(exact["prompt_encoder.embedding"], maths.feature_gram(prompt))


@pytest.mark.parametrize("init", ["random", "text", "times_100", "times_0.01"])
def test_prompt_basis_keeps_the_threshold_of_old_token_energy_whatever_the_prompt_scale(init):
    """The old tokens' basis keeps ≥ τ of their energy and the old prompt rows' span is kept whole, whatever the
    prompt's scale; one Gram over both (as before) lets large prompt rows take the whole threshold."""
    from peft_gp.core import maths

    model, task_type, _ = _prompt_model("bert", tokens=10, gp_threshold=0.97)
    prompt = model.prompt_encoder["default"].embedding.weight
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if init == "text":  # what PEFT's TEXT initialisation does: rows copied from token embeddings
            prompt.copy_(model.word_embeddings.weight[torch.randint(4, VOCAB, (10,), generator=generator)])
        elif init != "random":  # PEFT's default is N(0, 1) rows: norm² ≈ d, far above token embeddings
            prompt.mul_(100.0 if init == "times_100" else 0.01)
    ids = torch.randint(4, VOCAB, (8, 12), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 2}
    peft_gp.update_memory(model, [batch])
    basis = peft_gp.get_memory(model).bases["prompt_encoder.embedding"].double()
    tokens = maths.feature_gram(model.word_embeddings(ids.flatten()).detach())
    rows = maths.feature_gram(prompt.detach())
    assert maths.captured_energy(tokens, basis) >= 0.97 - 1e-6
    assert maths.captured_energy(rows, basis) >= 1 - 1e-6
    if init == "times_100":
        mixed, _ = maths.grow_basis(tokens + rows, None, 0.97)
        assert maths.captured_energy(tokens, mixed) < 0.5  # the prompt rows took the threshold for themselves


def test_memory_of_per_head_bases_does_not_fit_a_shared_basis_config(tmp_path):
    model, task_type, make_batch = _prefix_model("gpt2", gp_protect_values=False)
    old = make_batch(0, task_type)
    peft_gp.update_memory(model, [old])
    peft_gp.save_pretrained(model, tmp_path)
    other, _, _ = _prefix_model("gpt2", gp_per_head=False, gp_protect_values=False)
    with pytest.raises(peft_gp.GPMemoryError, match="key_prefix"):
        peft_gp.load_memory(other, str(tmp_path))

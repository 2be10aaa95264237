"""LoRA's layer types and variants beyond ``nn.Linear`` (the matrix holds one model of each kind): the feature rows
equal what each factor reads, every variant keeps old outputs at threshold 1.0 with ``"update"`` projection while
still learning, DoRA's magnitude rule is what makes DoRA exact, and what cannot be protected is refused."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from peft.tuners.lora.variants import ArrowLinearVariant
from torch import nn

import peft_gp
from peft_gp import GPLoraConfig, GPProjector
from peft_gp.core import maths
from peft_gp.wiring import features
from peft_gp.wiring.features import AttentionInputs, ConvPatches, TokenCounts, attention_values
from peft_gp.wiring.state import resolve_groups

pytestmark = pytest.mark.filterwarnings("ignore:The memory now fills", "ignore:.*invalid shape")


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, X):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(X)))))


class Convs(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv, self.conv2, self.head = conv(4, 8, 3, padding=1), conv(8, 8, 2, stride=2), nn.Linear(8, 3)

    def forward(self, X):
        return self.head(self.conv2(torch.relu(self.conv(X))).flatten(2).mean(-1))


class Tokens(nn.Module):
    def __init__(self, vocabulary: int = 40) -> None:
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(vocabulary, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, X):
        return self.head(torch.relu(self.lin(self.emb(X))).mean(1))


def batch(kind: str, task: int, dims: int = 2) -> dict:
    """Task 0 has low-rank features (4 of 16 inputs, one channel constant in space, 5 tokens); task 1 does not."""
    generator = torch.Generator().manual_seed(task)
    if kind == "tokens":
        low, high = (3, 8) if task == 0 else (20, 40)
        return {"X": torch.randint(low, high, (4, 6), generator=generator)}
    if kind == "convs":
        shape = (4, 4) + (6,) * dims
        if task == 1:
            return {"X": torch.randn(shape, generator=generator)}
        pixels = torch.zeros(shape)
        pixels[:, 0] = torch.randn((4,) + (1,) * dims, generator=generator)
        return {"X": pixels}
    rows = torch.randn(8, 16, generator=generator)
    if task == 0:
        rows[:, 4:] = 0
    return {"X": rows}


def two_tasks(model, kind: str, dims: int = 2, projected: bool = True) -> tuple[float, float]:
    """Task 1, memory at threshold 1.0, task 2 with AdamW + weight decay; (relative drift of task 1's outputs, largest
    change of a trainable weight)."""

    def steps(data, count, optimizer):
        model.train()
        for _ in range(count):
            (model(**data) - 1.0).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    params = [p for p in model.parameters() if p.requires_grad]
    old, new = batch(kind, 0, dims), batch(kind, 1, dims)
    steps(old, 10, torch.optim.AdamW(params, lr=1e-2))
    peft_gp.update_memory(model, [old])
    model.eval()
    with torch.no_grad():
        before = model(**old).clone()
    weights = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    projector = GPProjector(model).attach(optimizer) if projected else None
    steps(new, 15, optimizer)
    if projector:
        projector.detach()
    model.eval()
    with torch.no_grad():
        after = model(**old)
    moved = max((p.detach() - w).abs().max().item() for p, w in zip(params, weights))
    return (after - before).abs().max().item() / before.abs().max().item(), moved


VARIANTS = {
    "kasa": (Mlp, "mlp", {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 4}),
    "monteclora": (Mlp, "mlp", {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)}),
    "velora": (Mlp, "mlp", {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2)}),
    "mica": (Mlp, "mlp", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    "bdlora": (Mlp, "mlp", {"target_modules": ["lin0", "lin1"], "use_bdlora": BdLoraConfig(
        target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)}),  # fmt: skip
    "lora-bias": (Mlp, "mlp", {"target_modules": ["lin0", "lin1"], "lora_bias": True}),
    "dora": (Mlp, "mlp", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    "conv3d": (lambda: Convs(3), "convs", {"target_modules": ["conv", "conv2"]}),
    "dora-conv2d": (lambda: Convs(2), "convs", {"target_modules": ["conv", "conv2"], "use_dora": True}),
    "embedding": (Tokens, "tokens", {"target_modules": ["emb", "lin"]}),
    "dora-embedding": (Tokens, "tokens", {"target_modules": ["emb"], "use_dora": True}),
}


def variant_model(name: str):
    build, kind, settings = VARIANTS[name]
    torch.manual_seed(0)
    return peft_gp.get_peft_model(build(), GPLoraConfig(gp_threshold=1.0, **settings)), kind


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_keeps_old_outputs_exactly_and_still_learns(name):
    model, kind = variant_model(name)
    drift, moved = two_tasks(model, kind, dims=3 if name == "conv3d" else 2)
    assert drift <= 1e-4 and moved > 1e-2, (drift, moved)
    model, kind = variant_model(name)
    drift, _ = two_tasks(model, kind, dims=3 if name == "conv3d" else 2, projected=False)
    assert drift > 1e-2, drift


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 3, padding=1),
        nn.Conv1d(3, 4, 4, stride=2, padding="valid", dilation=2),
        nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 0)),
        nn.Conv2d(3, 4, 4, padding="same", dilation=(1, 2)),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv3d(3, 4, 2, stride=(1, 2, 1), padding=1),
    ],
)
def test_conv_patches_times_the_kernel_are_the_convolution(conv):
    """Each row of the patches, times the flattened kernel, is one output position (GPM's rule for convolutions)."""
    x = torch.randn((2, 3) + (7,) * (conv.weight.dim() - 2))
    rows = ConvPatches.of(conv)(x, None)
    expected = conv._conv_forward(x, conv.weight, None).movedim(1, -1).reshape(-1, 4)
    torch.testing.assert_close(rows @ conv.weight.view(4, -1).T, expected)


def test_grouped_conv_groups_read_their_own_channels():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 5, 5)
    out = conv(x) - conv.bias.view(1, -1, 1, 1)
    for g in range(2):
        rows = ConvPatches.of(conv, channels=(2 * g, 2 * g + 2))(x, None)
        expected = out[:, 3 * g : 3 * g + 3].movedim(1, -1).reshape(-1, 3)
        torch.testing.assert_close(rows @ conv.weight[3 * g : 3 * g + 3].view(3, -1).T, expected)


def test_embedding_is_protected_block_by_block_without_a_vocabulary_square(monkeypatch):
    """Each block of the vocabulary gets its own basis (the one-hot Gram is diagonal, so this is the full rule);
    padding tokens stay out; old tokens' columns of A are kept, unused ones still learn."""
    monkeypatch.setattr(features, "EMBEDDING_BLOCK", 16)
    torch.manual_seed(0)
    model = peft_gp.get_peft_model(Tokens(40), GPLoraConfig(target_modules=["emb"], gp_threshold=1.0))
    groups = resolve_groups(model)
    names = [group.name for group in groups]
    assert names == ["emb.lora_embedding_A.tokens0-16", "emb.lora_embedding_A.tokens16-32",
                     "emb.lora_embedding_A.tokens32-40", "emb.lora_embedding_B"]  # fmt: skip
    assert [group.dim for group in groups] == [16, 16, 8, 8]
    ids = torch.tensor([[3, 3, 17, 0], [5, 39, 0, 0]])
    rows = groups[1].features(ids, ids != 0)
    torch.testing.assert_close(maths.feature_gram(rows), torch.diag(torch.eye(16)[1].double()))
    onehot = nn.functional.one_hot(ids[ids != 0], 40).double()[:, :16]
    torch.testing.assert_close(maths.feature_gram(groups[0].features(ids, ids != 0)), onehot.T @ onehot)

    drift, moved = two_tasks(model, "tokens")
    assert drift <= 1e-4 and moved > 1e-2, (drift, moved)
    assert peft_gp.get_memory(model).bases["emb.lora_embedding_A.tokens0-16"].shape[1] == 5  # tokens 3..7


def test_token_counts_equal_the_gram_of_one_hot_rows():
    ids = torch.tensor([[1, 2, 2, 9], [9, 9, 4, 0]])
    counts = TokenCounts(0, 12)(ids, None)
    onehot = nn.functional.one_hot(ids.reshape(-1), 12).double()
    torch.testing.assert_close(maths.feature_gram(counts), onehot.T @ onehot)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_values_are_what_out_proj_reads(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        out = mha(x, x, x, key_padding_mask=padding)[0]
        values = attention_values(mha, {"query": x, "key": x, "value": x, "key_padding_mask": padding})
    values = values.transpose(0, 1) if batch_first else values
    torch.testing.assert_close(nn.functional.linear(values, mha.out_proj.weight, mha.out_proj.bias), out)


def test_attention_factors_read_every_query_key_and_value_row():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.MultiheadAttention(8, 2)), GPLoraConfig(target_modules=["0"], r=4))
    groups = {group.name: group for group in resolve_groups(model)}
    assert set(groups) == {"0.lora_A", "0.lora_B", "0.out_proj.lora_A", "0.out_proj.lora_B"}
    assert isinstance(groups["0.lora_A"].source, AttentionInputs)
    q, k = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
    emitted = []
    handle = groups["0.lora_A"].source.attach(lambda rows, masked: emitted.append(rows))
    with torch.no_grad():
        model.base_model.model[0](q, k, k)
    handle.remove()
    assert len(emitted) == 2 and torch.equal(emitted[0], q) and torch.equal(emitted[1], k)  # value is key: once


@pytest.mark.parametrize("name", ["dora", "dora-conv2d", "dora-embedding"])
def test_dora_is_exact_because_its_magnitude_follows_the_norm(name):
    """Projecting A and B keeps (W + sBA) x on old inputs, but DoRA divides by the row norms of W + sBA, which still
    move: with the magnitude only kept fixed (no rule) or left free, old outputs drift; with m/‖W + sBA‖ kept they
    do not (the figures in docs/paradigms.md)."""
    drifts = {}
    for mode in ("rule", "fixed", "free"):
        model, kind = variant_model(name)
        groups = peft_gp.wiring.state.get_state(model).groups
        for group in groups:
            if group.rule is not None and mode != "rule":
                group.rule = None
                group.frozen = mode == "fixed"
        drifts[mode] = two_tasks(model, kind)[0]
    assert drifts["rule"] <= 1e-4 < drifts["fixed"] and drifts["free"] > 1e-4, drifts


def test_trainable_base_biases_are_kept_fixed_from_the_second_task():
    torch.manual_seed(0)
    model = peft_gp.get_peft_model(Mlp(), GPLoraConfig(target_modules=["lin0"], bias="lora_only", gp_threshold=1.0))
    fixed = [group.name for group in resolve_groups(model) if group.frozen]
    assert fixed == ["lin0.base_layer.bias"]
    drift, moved = two_tasks(model, "mlp")
    assert drift <= 1e-4 and moved > 1e-2


class UsesParameter(nn.Module):
    """Computes with its parameter as ``x @ W`` (not ``F.linear``): the first axis of ``W`` reads the input."""

    def __init__(self, shape=(16, 16), use=torch.matmul) -> None:
        super().__init__()
        self.weight, self.use = nn.Parameter(torch.randn(*shape) / 4), use

    def forward(self, x):
        return self.use(x, self.weight)


class ParameterMlp(Mlp):
    def __init__(self, use=torch.matmul) -> None:
        super().__init__()
        self.lin0 = UsesParameter(use=use)


@pytest.mark.parametrize("targets", [["lin0.weight"], ["lin1.weight"], ["lin0.weight", "lin1.weight"]])
def test_lora_on_parameters_is_read_where_they_are_used(targets):
    """``x @ W`` (lin0) and ``F.linear(x, W)`` (lin1): each use feeds the orientation it contracts."""
    torch.manual_seed(0)
    config = GPLoraConfig(target_parameters=targets, gp_threshold=1.0)
    model = peft_gp.get_peft_model(ParameterMlp(), config)
    drift, moved = two_tasks(model, "mlp")
    assert drift <= 1e-4 and moved > 1e-2, (drift, moved)
    bases = peft_gp.get_memory(model).bases
    if "lin0.weight" in targets:  # x @ W: Bᵀ and Aᵀ hold the features, A and B none
        assert bases["lin0.lora_B.first_axis"].shape[1] == 4 and bases["lin0.lora_A"].shape[1] == 0
    if "lin1.weight" in targets:  # F.linear: A and B
        assert bases["lin1.lora_A"].shape[1] > 0 and bases["lin1.lora_B.first_axis"].shape[1] == 0
    torch.manual_seed(0)
    drift, _ = two_tasks(peft_gp.get_peft_model(ParameterMlp(), config), "mlp", projected=False)
    assert drift > 1e-2


def test_trainable_tokens_keep_old_tokens_and_tied_output_rows():
    """``trainable_token_indices`` on GPT-2's tied embedding: rows of tokens old tasks used stay (embedding side) and
    every row changes only orthogonally to the old output-layer inputs (logits side)."""
    from .testing import CASES, train_steps

    case = next(case for case in CASES if case.name == "gpt2")
    config = GPLoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True, trainable_token_indices=[5, 6, 30, 31],
                          gp_threshold=1.0, task_type="CAUSAL_LM")  # fmt: skip
    model = peft_gp.get_peft_model(case.build(), config)
    groups = {group.name: group for group in resolve_groups(model)}
    assert {"transformer.wte.token_adapter.trainable_tokens_delta",
            "lm_head.token_adapter.trainable_tokens_delta.outputs"} <= set(groups)  # fmt: skip
    old, new = case.make_batch(0), case.make_batch(1)
    train_steps(model, old, 5)
    peft_gp.update_memory(model, [old])
    before = case.output(model, old)
    delta = groups["transformer.wte.token_adapter.trainable_tokens_delta"].weight
    start = delta.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    GPProjector(model).attach(optimizer)
    train_steps(model, new, 10, optimizer=optimizer)
    assert (case.output(model, old) - before).abs().max().item() <= 1e-4 * before.abs().max().item()
    assert (delta.detach() - start)[2:].abs().max().item() > 1e-3  # tokens 30, 31 (unused by task 0) still learn


def test_what_cannot_be_protected_is_refused_with_the_fix():
    experts = nn.Sequential(UsesParameter((2, 16, 16), torch.bmm))
    model = get_peft_model(experts, GPLoraConfig(target_parameters=["0.weight"], r=2))
    with pytest.raises(ValueError, match=r"3-d parameter 'weight'.*2 experts.*Fix: target the experts"):
        resolve_groups(model)

    model = peft_gp.get_peft_model(nn.Sequential(UsesParameter(use=lambda x, w: x * w.sum())),
                                   GPLoraConfig(target_parameters=["0.weight"]))  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot see how the LoRA-adapted parameter '0.weight' is used.*'sum'"):
        peft_gp.update_memory(model, [{"input": torch.randn(2, 16)}])

    model = get_peft_model(Mlp(), GPLoraConfig(target_modules=["lin0"]))
    model.base_model.model.lin0.lora_variant["default"] = ArrowLinearVariant()
    with pytest.raises(ValueError, match=r"ArrowLinearVariant on 'lin0'.*Fix: train the experts"):
        resolve_groups(model)

    class Unknown(ArrowLinearVariant.__mro__[1]):  # a LoraVariant peft_gp has never seen
        pass

    model.base_model.model.lin0.lora_variant["default"] = Unknown()
    with pytest.raises(ValueError, match=r"variant Unknown on 'lin0'.*does not know what this variant computes"):
        resolve_groups(model)


def test_plain_lora_config_builds_the_same_adapter():
    """GPLoraConfig adds only the gp_* fields: the adapters PEFT builds from both configs are the same."""
    for settings in (VARIANTS["conv3d"], VARIANTS["embedding"], VARIANTS["lora-bias"]):
        build, _, kwargs = settings
        torch.manual_seed(0)
        plain = get_peft_model(build(), LoraConfig(**kwargs))
        torch.manual_seed(0)
        gp = get_peft_model(build(), GPLoraConfig(**kwargs))
        assert {n: p.shape for n, p in plain.named_parameters()} == {n: p.shape for n, p in gp.named_parameters()}


def test_activated_lora_keeps_old_outputs():
    """aLoRA adapts only the tokens from its invocation sequence on: only those reach ``lora_A``, which reads them."""
    from .testing import tiny_llama, train_steps

    config = GPLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6],
                          r=8, gp_threshold=1.0)  # fmt: skip
    model = peft_gp.get_peft_model(tiny_llama(), config)

    def tokens(task: int) -> dict:
        low, high = (8, 14) if task == 0 else (20, 60)
        ids = torch.randint(low, high, (2, 6), generator=torch.Generator().manual_seed(task))
        ids[:, 2:4] = torch.tensor([5, 6])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    old, new = tokens(0), tokens(1)
    train_steps(model, old, 10)
    peft_gp.update_memory(model, [old])
    model.eval()
    with torch.no_grad():
        before = model(**old).logits.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    GPProjector(model).attach(optimizer)
    losses = train_steps(model, new, 10, optimizer=optimizer)
    model.eval()
    with torch.no_grad():
        assert (model(**old).logits - before).abs().max().item() <= 1e-4 * before.abs().max().item()
    assert losses[-1] < losses[0]


def test_deleted_adapter_leaves_no_gp_state_and_a_copy_keeps_its_own():
    """PEFT's own tests check that ``delete_adapter`` leaves nothing keyed by the adapter: neither does peft_gp, and a
    new adapter under the old name starts fresh; ``copy.deepcopy`` of a model carries its memory, tied to the copy."""
    import copy

    model = peft_gp.get_peft_model(Mlp(), GPLoraConfig(target_modules=["lin0"]))
    peft_gp.update_memory(model, [batch("mlp", 0)])
    copied = copy.deepcopy(model)
    assert peft_gp.get_memory(copied).tasks_seen == 1 and peft_gp.get_memory(copied) is not peft_gp.get_memory(model)
    weight = peft_gp.wiring.state.get_state(copied).groups[0].weight
    assert any(weight is param for param in copied.parameters())

    model.add_adapter("other", GPLoraConfig(target_modules=["lin0"]))
    model.delete_adapter("default")
    assert "default" not in model.gp_states
    model.add_adapter("default", GPLoraConfig(target_modules=["lin0"]))
    assert peft_gp.get_memory(model, "default").tasks_seen == 0


def test_modules_to_save_that_cannot_be_projected_are_kept_fixed():
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0, self.gru = nn.Linear(16, 6), nn.GRU(6, 5, batch_first=True)

        def forward(self, X):
            return self.gru(self.lin0(X))[0][:, -1]

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"'gru' \(GRU\), which cannot be projected.*kept fixed"):
        model = peft_gp.get_peft_model(Recurrent(), GPLoraConfig(target_modules=["lin0"], modules_to_save=["gru"]))
    assert all(group.frozen for group in resolve_groups(model) if group.name.startswith("gru."))
    old = {"X": batch("mlp", 0)["X"].reshape(2, 4, 16)}
    peft_gp.update_memory(model, [old])
    model.eval()
    before = model(**old).detach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    GPProjector(model).attach(optimizer)
    model.train()
    model(X=torch.randn(2, 4, 16)).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    assert (model(**old) - before).abs().max().item() <= 1e-6


def test_custom_lora_layers_are_refused_unless_they_compute_like_peft_s():
    """A LoRA layer registered with ``_register_custom_module`` is protected like the PEFT layer it subclasses when it
    keeps that layer's forward; one with a forward of its own is refused (what it computes is unknown)."""
    from peft.tuners import lora

    class LinearLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features, self.weight = 16, 16, nn.Parameter(torch.randn(16, 16) / 4)

        def forward(self, x):
            return nn.functional.linear(x, self.weight)

    class SameAsLinear(lora.Linear):
        pass

    class OwnForward(lora.Linear):
        def forward(self, x, *args, **kwargs):
            return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)).exp()

    for custom, accepted in ((SameAsLinear, True), (OwnForward, False)):
        model = Mlp()
        model.lin0 = LinearLike()
        config = GPLoraConfig(target_modules=["lin0"], gp_threshold=1.0)
        config._register_custom_module({LinearLike: custom})
        model = get_peft_model(model, config)
        if accepted:
            drift, moved = two_tasks(model, "mlp")
            assert drift <= 1e-4 and moved > 1e-2
        else:
            with pytest.raises(ValueError, match=r"custom LoRA layer OwnForward on 'lin0'.*not one of PEFT's"):
                resolve_groups(model)


def test_a_custom_lora_layer_without_weights_needs_no_projection():
    """PEFT's ``TestDynamicDispatch`` case: a custom LoRA layer for ``nn.LSTM`` whose ``update_layer`` never ran holds
    no parameters of the adapter, so nothing there trains and nothing is refused; given a trainable parameter of the
    adapter, its unknown forward is refused again."""
    from peft.tuners import lora

    class WithLstm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(10, 20)

    class MyLora(nn.Module, lora.LoraLayer):
        def __init__(self, base_layer, adapter_name, **kwargs):
            super().__init__()
            lora.LoraLayer.__init__(self, base_layer, **kwargs)
            self._active_adapter = adapter_name

    config = GPLoraConfig(target_modules=["lstm"])
    config._register_custom_module({nn.LSTM: MyLora})
    with pytest.warns(UserWarning, match="Unsupported layer type"):
        model = get_peft_model(WithLstm(), config)
    assert isinstance(model.base_model.lstm, MyLora)
    assert [g.name for g in resolve_groups(model)] == []
    model.base_model.lstm.extra = nn.ParameterDict({"default": nn.Parameter(torch.zeros(3))})
    with pytest.raises(ValueError, match=r"custom LoRA layer MyLora on 'lstm'.*not one of PEFT's"):
        resolve_groups(model)


@pytest.mark.parametrize(
    "use",
    [
        lambda x, w: nn.functional.linear(input=x, weight=w.T),  # keywords, transposed: W's first axis
        lambda x, w: (w.t() @ x.T).T,  # W on the left, transposed
        lambda x, w: torch.cat([x @ w, x @ w], dim=-1)[..., :16],  # a product inside a list of products
    ],
)
def test_parameter_uses_are_read_however_they_are_written(use):
    torch.manual_seed(0)
    config = GPLoraConfig(target_parameters=["lin0.weight"], gp_threshold=1.0)
    model = peft_gp.get_peft_model(ParameterMlp(use), config)
    drift, moved = two_tasks(model, "mlp")
    assert drift <= 1e-4 and moved > 1e-2, (drift, moved)


def test_a_parameter_hidden_in_a_list_is_not_missed():
    model = peft_gp.get_peft_model(nn.Sequential(UsesParameter(use=lambda x, w: x @ torch.stack([w, w]).sum(0))),
                                   GPLoraConfig(target_parameters=["0.weight"]))  # fmt: skip
    with pytest.raises(ValueError, match=r"parameter '0.weight' is used: it reached 'stack'"):
        peft_gp.update_memory(model, [{"input": torch.randn(2, 16)}])

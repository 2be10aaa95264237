"""Per-task Hub pushes against a fake Hub on 127.0.0.1: branches, commits, model card, resume, and failures.

``huggingface_hub`` reads HF_ENDPOINT once, at import; the ``hub`` fixture (conftest.py) points its
already-imported constants (and the module-level ``HfApi`` that PEFT's ``file_exists`` uses) at the fake server, and
one test runs plain PEFT in a fresh process with HF_ENDPOINT set, the way users do.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel

import peft_gp
from peft_gp import GPTrainer
from peft_gp.hub import GPHubError, push_task_folder, push_task_to_hub, task_branch

from .fake_hub import FakeHub
from .testing import (
    REPO,
    TOKEN,
    assert_saved,
    assert_token_hidden,
    finished_task,
    gp_model,
    logits_on,
    mean_loss,
    point_hub_at,
    task_dataset,
    tiny_bert,
    training_args,
)

SCRIPT = Path(__file__).parent / "scripts" / "load_from_hub.py"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("paradigm", ["lora", "adapter"])
def test_two_tasks_pushed_then_resumed_from_task_branch(hub, tmp_path, paradigm):
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    model = gp_model(paradigm)
    trainer = GPTrainer(
        model=model,
        args=training_args(tmp_path / "run", num_train_epochs=3),
        train_dataset=old_task,
        gp_task_name="few tokens",
        gp_push_to_hub=REPO,
        gp_push_kwargs={"accuracy_matrix": [[0.9]]},
    )
    trainer.train()
    after_task1 = trainable_state(model)
    bases_task1 = {name: basis.clone() for name, basis in trainer.gp_memory.bases.items()}
    logits_task1 = logits_on(model, old_task)
    assert trainer.gp_last_push.revision == "task-01"

    trainer.train_dataset, trainer.gp_task_name = new_task, "many tokens"
    trainer.gp_push_kwargs["accuracy_matrix"] = [[0.9], [0.85, 0.8]]
    trainer.train()

    repo = hub.repos[REPO]
    assert {"main", "task-01", "task-02"} <= set(repo.refs)
    assert repo.refs["main"] == repo.refs["task-02"] != repo.refs["task-01"]
    assert hub.messages(REPO, "task-01")[0] == "Task 1 (few tokens): adapter, GP memory and model card"
    assert hub.messages(REPO, "main")[:2] == [
        "Task 2 (many tokens): adapter, GP memory and model card",
        "Task 1 (few tokens): adapter, GP memory and model card",
    ]
    local = tmp_path / "run" / "hub" / "task-01"
    files = hub.files(REPO, "task-01")
    for name in ("adapter_config.json", "adapter_model.safetensors", "gp_memory.safetensors", "gp_tasks.json"):
        assert files[name] == (local / name).read_bytes(), name  # the local save is what was pushed
    assert {"README.md", "gp_accuracy_matrix.png"} <= set(files)
    assert files["gp_accuracy_matrix.png"].startswith(b"\x89PNG")

    card = ModelCard(hub.files(REPO, "task-02")["README.md"].decode())
    assert card.data.library_name == "peft"
    assert {"peft", "peft-gp", "continual-learning"} <= set(card.data.tags)
    assert "| 2 | 85.0 | 80.0 | 82.5 |" in card.text and "T2 many tokens" in card.text
    assert "![accuracy matrix](gp_accuracy_matrix.png)" in card.text
    assert "| backward_transfer | -0.0500 |" in card.text and "| forgetting | 0.0500 |" in card.text
    assert "| `gp_threshold` | `1.0` |" in card.text and "| 2 | `task-02` | many tokens | 2, 3 |" in card.text

    # Someone else picks the sequence up after task 1
    resumed = peft_gp.from_pretrained(tiny_bert(), REPO, revision="task-01", is_trainable=True)
    restored = trainable_state(resumed)
    assert set(restored) == set(after_task1) and any("classifier" in name for name in restored)
    for name, value in after_task1.items():
        assert torch.equal(restored[name], value), name  # adapter and head, bit for bit
    memory = peft_gp.get_memory(resumed)
    assert memory.tasks_seen == 1
    for name, basis in bases_task1.items():
        assert torch.equal(memory.bases[name], basis), name
    state = peft_gp.get_task_state(resumed)
    assert state.task_names == ["few tokens"] and state.classes_seen == [0, 1] and state.accuracy_matrix == [[0.9]]

    loss_before = mean_loss(resumed, new_task)
    GPTrainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=new_task).train()
    after = logits_on(resumed, old_task)
    # float32 tolerance: 1e-4 of the logit scale, and no less than 1e-4 absolute (the adapter's logits are ~0.4 here)
    assert (after - logits_task1).abs().max().item() <= 1e-4 * max(1.0, logits_task1.abs().max().item())
    assert mean_loss(resumed, new_task) < 0.8 * loss_before
    assert peft_gp.get_task_state(resumed).task_names == ["few tokens", "task-02"]

    plain = PeftModel.from_pretrained(tiny_bert(), REPO, revision="task-01")
    torch.testing.assert_close(logits_on(plain, old_task), logits_task1, rtol=0, atol=0)


def test_plain_peft_in_a_fresh_process_with_hf_endpoint(hub, tmp_path):
    model = finished_task(tmp_path)
    expected = logits_on(model, task_dataset(0, 8))
    hub.lfs_threshold = 16 * 1024  # the adapter weights (35 kB) go through LFS and come back by redirect
    push_task_to_hub(model, REPO, local_dir=str(tmp_path / "local"))
    assert "adapter_model.safetensors" in hub.lfs_paths(REPO, "task-01")
    out = tmp_path / "logits.pt"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), REPO, "task-01", str(out)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), expected, rtol=0, atol=0)
    assert hub.calls("GET", "/objects/", server="storage")  # downloaded from the LFS storage


def test_subfolder_private_and_pull_request(hub, tmp_path):
    model = finished_task(tmp_path)
    first = push_task_to_hub(model, REPO, local_dir=str(tmp_path / "t1"), private=True, subfolder_per_task=True)
    assert hub.calls("POST", "/api/repos/create")[0].body["visibility"] == "private"
    assert hub.repos[REPO].private
    files = hub.files(REPO, "main")
    assert {"README.md", "task-01/adapter_model.safetensors", "task-01/gp_memory.safetensors"} <= set(files)
    assert "adapter_model.safetensors" not in files  # only the card sits at the root
    assert (first.revision, first.subfolder) == ("task-01", "task-01")
    loaded = peft_gp.from_pretrained(tiny_bert(), REPO, revision=first.revision, subfolder=first.subfolder)
    assert peft_gp.get_memory(loaded).tasks_seen == 1

    GPTrainer(model=model, args=training_args(tmp_path / "t2train"), train_dataset=task_dataset(1, 8)).train()
    main_before = hub.repos[REPO].refs["main"]
    second = push_task_to_hub(model, REPO, local_dir=str(tmp_path / "t2"), subfolder_per_task=True, create_pr=True)
    commit_call = hub.calls("POST", "/commit/")[-1]
    assert commit_call.query.get("create_pr") == ["1"]
    assert second.revision == "refs/pr/1" and second.commit.pr_url.endswith("/discussions/1")
    assert hub.repos[REPO].refs["main"] == main_before and "task-02" not in hub.repos[REPO].refs
    loaded = peft_gp.from_pretrained(tiny_bert(), REPO, revision=second.revision, subfolder=second.subfolder)
    assert peft_gp.get_memory(loaded).tasks_seen == 2


def test_rejected_token_gives_401_error_after_local_save(hub_env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    model = finished_task(tmp_path)
    with FakeHub(token="hf_the_right_one") as server:
        point_hub_at(hub_env, server.endpoint)
        with pytest.raises(GPHubError, match="401") as raised:
            push_task_to_hub(model, REPO, local_dir=str(tmp_path / "local"))
        sent = [r.headers.get("authorization") for r in server.requests if r.path != "/api/agent-harnesses"]
        assert sent and all(header == f"Bearer {TOKEN}" for header in sent)
    assert "push_task_folder" in str(raised.value) and raised.value.local_dir == str(tmp_path / "local")
    assert_saved(tmp_path / "local")
    assert_token_hidden(raised.value, caplog)


def test_missing_token_is_refused_before_any_request(hub, hub_env, tmp_path):
    hub_env.delenv("HF_TOKEN")
    model = finished_task(tmp_path)
    with pytest.raises(GPHubError, match="HF_TOKEN"):
        push_task_to_hub(model, REPO, local_dir=str(tmp_path / "local"))
    assert_saved(tmp_path / "local")
    assert not [r for r in hub.requests if r.path != "/api/agent-harnesses"]


def closed_port_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_server_down_then_retry_from_the_local_folder(hub_env, tmp_path, caplog):
    model = finished_task(tmp_path)
    point_hub_at(hub_env, closed_port_endpoint())
    local = tmp_path / "local"
    with pytest.raises(GPHubError, match="could not be reached") as raised:
        push_task_to_hub(model, REPO, local_dir=str(local))
    assert_saved(local)
    assert_token_hidden(raised.value, caplog)
    with FakeHub(token=TOKEN) as server:
        point_hub_at(hub_env, server.endpoint)
        push = push_task_folder(str(local), REPO)
        assert push.revision == "task-01"
        assert server.files(REPO, "task-01")["gp_memory.safetensors"] == (local / "gp_memory.safetensors").read_bytes()


def test_interrupted_upload_leaves_no_branch_and_retries(hub, tmp_path, caplog):
    model = finished_task(tmp_path)
    local = tmp_path / "local"
    hub.fail_commits = 1
    with pytest.raises(GPHubError, match="connection broke off") as raised:
        push_task_to_hub(model, REPO, local_dir=str(local))
    assert "task-01" not in hub.repos[REPO].refs
    assert_token_hidden(raised.value, caplog)
    push_task_folder(str(local), REPO)
    pushed = hub.files(REPO, "task-01")["adapter_model.safetensors"]
    assert pushed == (local / "adapter_model.safetensors").read_bytes()
    with pytest.raises(GPHubError, match="already has a branch 'task-01'"):
        push_task_folder(str(local), REPO)


def test_unknown_revision_and_missing_repo_fail_clearly(hub, tmp_path):
    model = finished_task(tmp_path)
    push_task_to_hub(model, REPO, local_dir=str(tmp_path / "local"))
    with pytest.raises(GPHubError, match="revision 'task-09'.*does not exist.*task-01"):
        peft_gp.from_pretrained(tiny_bert(), REPO, revision="task-09")
    with pytest.raises(GPHubError, match="does not exist or this token may not access it"):
        peft_gp.from_pretrained(tiny_bert(), "user/no-such-repo", revision="task-01")


def test_task_ids_must_match_the_memory(hub, tmp_path):
    model = finished_task(tmp_path)
    with pytest.raises(ValueError, match="memory holds 1 task"):
        push_task_to_hub(model, REPO, task_id=1, local_dir=str(tmp_path / "local"))
    assert task_branch(0) == "task-01" and task_branch(11) == "task-12"
    with pytest.raises(ValueError, match="hub_model_id"):
        GPTrainer(model=model, args=training_args(tmp_path), train_dataset=task_dataset(0, 4), gp_push_to_hub=True)
    args = training_args(tmp_path, push_to_hub=True, hub_model_id=REPO)
    with pytest.raises(ValueError, match="set push_to_hub=False"):
        GPTrainer(model=model, args=args, train_dataset=task_dataset(0, 4), gp_push_to_hub=True)
    assert not hub.calls("POST", "/api/repos/create")  # refused before the Trainer made the repo
    with pytest.raises(ValueError, match=r"may not set \['local_dir'\]"):
        GPTrainer(model=model, args=training_args(tmp_path), gp_push_to_hub=REPO, gp_push_kwargs={"local_dir": "x"})


def test_task_record_refuses_gaps_and_damaged_files(tmp_path):
    state = peft_gp.GPTaskState()
    state.record(0, "a", [1, 0, 1])
    with pytest.raises(ValueError, match="next one is task_id=1"):
        state.record(2, "c")
    state.record(1, None, ["x"])
    assert state.task_names == ["a", "task-02"] and state.classes_seen == [0, 1, "x"]
    state.save(str(tmp_path / "gp_tasks.json"))
    assert peft_gp.GPTaskState.load(str(tmp_path / "gp_tasks.json")) == state
    (tmp_path / "bad.json").write_text('{"gp_format_version": 1, "task_names": ["a"]}')
    with pytest.raises(ValueError, match="bad.json is not a valid gp_tasks.json"):
        peft_gp.GPTaskState.load(str(tmp_path / "bad.json"))
    (tmp_path / "new.json").write_text('{"gp_format_version": 9, "task_names": [], "task_classes": []}')
    with pytest.raises(ValueError, match="newer than this peft_gp reads"):
        peft_gp.GPTaskState.load(str(tmp_path / "new.json"))
    with pytest.raises(ValueError, match="memory is empty"):
        push_task_to_hub(gp_model(), REPO, local_dir=str(tmp_path / "local"))
    assert not (tmp_path / "local").exists()


def test_card_names_the_base_model_only_if_the_hub_knows_it(hub_env, tmp_path):
    model = finished_task(tmp_path)
    with FakeHub(token=TOKEN, models=("org/tiny-bert",)) as server:
        point_hub_at(hub_env, server.endpoint)
        model.peft_config["default"].base_model_name_or_path = "org/tiny-bert"
        push_task_to_hub(model, REPO, local_dir=str(tmp_path / "known"))
        card = ModelCard(server.files(REPO, "task-01")["README.md"].decode())
        assert card.data.base_model == "org/tiny-bert" and "for `org/tiny-bert`" in card.text

        GPTrainer(model=model, args=training_args(tmp_path / "t2"), train_dataset=task_dataset(1, 8)).train()
        model.peft_config["default"].base_model_name_or_path = "models/my-local-bert"  # a relative local name
        push_task_to_hub(model, REPO, local_dir=str(tmp_path / "unknown"))
        pushed = server.files(REPO, "task-02")["README.md"]
        assert ModelCard(pushed.decode()).data.base_model is None
        assert pushed == (tmp_path / "unknown" / "README.md").read_bytes()


def test_runner_pushes_every_task_with_the_accuracy_matrix_so_far(hub, tmp_path):
    from peft_gp.continual import RunConfig, run_sequence
    from peft_gp.continual.loading import load_model

    from .testing import save_tiny_text_model, text_dataset

    save_tiny_text_model(tmp_path / "model")
    text_dataset().save_to_disk(str(tmp_path / "data"))
    config = RunConfig(
        name="tiny",
        model=str(tmp_path / "model"),
        dataset=str(tmp_path / "data"),
        classes_per_task=[3, 3],
        max_length=8,
        epochs=2,
        batch_size=8,
        gp_memory_samples=16,
        output_dir=str(tmp_path / "run"),
        progress=False,
        plots=False,
        push_to_hub=REPO,
        hub_private=True,
    )
    run = run_sequence(config, say=lambda *_: None)
    assert {"task-01", "task-02"} <= set(hub.repos[REPO].refs)
    assert [record["hub_revision"] for record in run.main.tasks] == ["task-01", "task-02"]
    resumed = peft_gp.from_pretrained(load_model(config, 6, image=False), REPO, revision="task-02")
    state = peft_gp.get_task_state(resumed)
    assert state.task_names == [task["name"] for task in run.stream]
    expected = [row[: k + 1] for k, row in enumerate(run.accuracy_matrix)]
    assert state.accuracy_matrix == [[pytest.approx(v) for v in row] for row in expected]
    assert peft_gp.get_memory(resumed).tasks_seen == 2
    assert (tmp_path / "run" / "hub" / "task-02" / "gp_memory.safetensors").is_file()
    with pytest.raises(Exception, match="not a valid Hub repo id"):
        RunConfig(push_to_hub="me/bad repo")  # the Hub's own validator (a name without namespace is valid)

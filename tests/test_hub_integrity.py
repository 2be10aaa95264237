"""What a Hub push may publish, what the model card may show, and the large-file (LFS) path (issue 19, items 1, 5, 8).

* Pushes upload exactly the files the task save wrote (its ``gp_push_files.json``): a Trainer's ``output_dir``
  (``training_args.bin`` holds the token), ``.env`` or ``id_rsa`` beside a task save, an extra file named like the
  adapter, a manifest listing a pickle: all refused, naming the files, before any byte is written or sent.
* The token is in no message, no chained error and no log record; ``repo_id`` is checked before anything is written.
* Task and class names cannot break the card's tables or put HTML into it; accuracies must lie in [0, 1].
* Files above the fake Hub's LFS threshold go through the LFS batch, upload (one PUT or multipart) and verify
  endpoints, and come back from its storage; an upload cut off half-way is a ``GPHubError`` and the retry succeeds.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time

import httpx2
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http

import peft_gp
from peft_gp import GPTrainer
from peft_gp.hub import (
    MANIFEST_NAME,
    GPHubError,
    check_repo_id,
    markdown_text,
    push_task_folder,
    push_task_to_hub,
    save_task,
)

from .fake_hub import FakeHub
from .testing import (
    REPO,
    TOKEN,
    assert_saved,
    assert_token_hidden,
    finished_task,
    gp_model,
    serving_fake_hub,
    task_dataset,
    tiny_bert,
    training_args,
)


def hub_requests(server: FakeHub) -> list:
    return [r for r in server.requests if r.path != "/api/agent-harnesses"]


def tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. the allow-list ---------------------------------------------------------------------------------------------


def test_a_trainer_output_dir_is_refused_and_nothing_is_written_or_sent(hub, tmp_path):
    model = gp_trained_with_checkpoints(tmp_path / "run")
    run = tmp_path / "run"
    assert list(run.glob("**/training_args.bin"))  # what the issue saw published: it holds the Hub token
    before = tree(run)
    with pytest.raises(ValueError, match=r"holds files that a task save did not write: .*training_args\.bin"):
        push_task_to_hub(model, REPO, local_dir=str(run))
    assert tree(run) == before  # nothing written into it
    assert not hub_requests(hub)
    assert not list(tmp_path.glob(".tmp-*"))


def gp_trained_with_checkpoints(output_dir):
    model = gp_model()
    args = training_args(output_dir, num_train_epochs=1, save_strategy="epoch")
    GPTrainer(model=model, args=args, train_dataset=task_dataset(0, 8)).train()
    return model


def test_secrets_beside_a_task_save_are_refused(hub, tmp_path):
    model = finished_task(tmp_path)
    local = tmp_path / "local"
    local.mkdir()
    (local / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    with pytest.raises(ValueError, match=r"'\.env'.*Nothing was written"):
        push_task_to_hub(model, REPO, local_dir=str(local))
    assert sorted(p.name for p in local.iterdir()) == [".env"] and not hub_requests(hub)

    (local / ".env").unlink()
    push_task_to_hub(model, REPO, local_dir=str(local))  # an empty folder is fine
    listed = json.loads((local / MANIFEST_NAME).read_text())["files"]
    assert set(hub.files(REPO, "task-01")) == {".gitattributes", *listed}
    assert MANIFEST_NAME not in listed and "README.md" in listed

    (local / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (local / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (local / "sub").mkdir()
    (local / "sub" / "training_args.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"'\.env', 'id_rsa', 'sub/training_args\.bin'.*Nothing was sent"):
        push_task_folder(str(local), "user/other")
    assert "user/other" not in hub.repos
    with pytest.raises(ValueError, match=r"did not write: '\.env', 'id_rsa'"):
        save_task(model, str(local))  # nor saved into again


def test_extra_files_may_not_replace_the_task_files_nor_be_pickles(hub, tmp_path):
    model = finished_task(tmp_path)
    (tmp_path / "other").mkdir()
    fake_adapter = tmp_path / "other" / "adapter_model.safetensors"
    fake_adapter.write_bytes(b"not the trained adapter")
    local = tmp_path / "local"
    for extra, message in [
        (fake_adapter, "would replace the task's own adapter_model.safetensors"),
        (tmp_path / "other" / "README.md", "would replace the task's own README.md"),
        (tmp_path / "other" / "training_args.bin", "never pushed"),
        (tmp_path / "other" / "state.pt", "never pushed"),
        (tmp_path / "other" / ".env", "never pushed"),
    ]:
        extra.write_bytes(b"x")
        with pytest.raises(ValueError, match=re.escape(message)):
            push_task_to_hub(model, REPO, local_dir=str(local), extra_files=[str(extra)])
        assert not local.exists() and not hub_requests(hub)

    notes = tmp_path / "notes.txt"
    notes.write_text("trained on 8 examples\n")
    push_task_to_hub(model, REPO, local_dir=str(local), extra_files=[str(notes)])
    files = hub.files(REPO, "task-01")
    assert files["notes.txt"] == notes.read_bytes()
    assert files["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes() != b"x"


def test_a_manifest_listing_a_pickle_or_a_path_outside_is_refused(hub, tmp_path):
    model = finished_task(tmp_path)
    local = tmp_path / "local"
    save_task(model, str(local))
    manifest = json.loads((local / MANIFEST_NAME).read_text())
    (local / "training_args.bin").write_bytes(b"pickle with the token")
    for listed in (["training_args.bin"], ["../secret.txt"], ["/etc/passwd"]):
        (local / MANIFEST_NAME).write_text(json.dumps({**manifest, "files": manifest["files"] + listed}))
        with pytest.raises(ValueError, match="never pushed"):
            push_task_folder(str(local), REPO)
    (local / "training_args.bin").unlink()
    (local / MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match=f"holds no {MANIFEST_NAME}"):
        push_task_folder(str(local), REPO)
    assert not hub_requests(hub)


class LogsHeaders:
    """An HTTP client for huggingface_hub that logs each request's headers at DEBUG, as an HTTP debug log does."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def __call__(self) -> httpx2.Client:
        return httpx2.Client(event_hooks={"request": [_http.hf_request_event_hook, self.log]},
                             follow_redirects=True, timeout=None)  # fmt: skip

    def log(self, request) -> None:
        self.logger.debug("Send: %s authorization=%s", request.url, request.headers.get("authorization"))


@pytest.fixture
def header_debug_log(caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its own level is WARNING
    _http.set_client_factory(LogsHeaders(logging.getLogger("huggingface_hub.utils._http")))
    yield caplog
    _http.set_client_factory(_http.default_client_factory)


def test_token_kept_out_of_error_chain_and_logs_on_a_server_error(hub, tmp_path, header_debug_log):
    model = finished_task(tmp_path)
    hub.fail_status["commit"] = 500
    with pytest.raises(GPHubError, match="answered 500") as raised:
        push_task_to_hub(model, REPO, local_dir=str(tmp_path / "local"))
    assert_token_hidden(raised.value, header_debug_log)
    assert "authorization=Bearer <token>" in header_debug_log.text  # the debug line was written, redacted
    assert_saved(tmp_path / "local")
    hub.fail_status.clear()
    logging.getLogger("huggingface_hub.utils._http").debug("after the push: %s", TOKEN)
    assert TOKEN in header_debug_log.text  # the filter is gone once the push is over


def test_repo_id_is_checked_before_anything_is_written(hub, tmp_path):
    model = finished_task(tmp_path)
    for bad in ["user/cl run", "user/a\n# injected", "a/b/c", "user/x.git", "user--x/y", "", None, 42]:
        with pytest.raises(ValueError, match="repo id"):
            push_task_to_hub(model, bad, local_dir=str(tmp_path / "local"))
    assert not (tmp_path / "local").exists() and not hub_requests(hub)
    save_task(model, str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        push_task_folder(str(tmp_path / "saved"), "user/a`b")
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        save_task(model, str(tmp_path / "card"), repo_id='user/x"); import os  #')
    assert not (tmp_path / "card").exists() and not hub_requests(hub)
    assert check_repo_id("user/cl-run.v2") == "user/cl-run.v2" and check_repo_id("cl-run") == "cl-run"


def test_gp_trainer_checks_the_repo_id_when_built(tmp_path):
    model = gp_model()
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        GPTrainer(model=model, args=training_args(tmp_path), gp_push_to_hub="me/bad repo")


# ---- 5. the model card ---------------------------------------------------------------------------------------------

HOSTILE = "a|b\n## injected `code` <script>alert(1)</script> & [link](http://x) *bold* \\|"


def test_card_escapes_names_so_tables_and_html_hold(tmp_path):
    model = finished_task(tmp_path, name=HOSTILE)
    local = tmp_path / "local"
    save_task(model, str(local), classes=["x|y", "<b>z</b>", "line\nbreak"], accuracy_matrix=[[0.75]])
    text = (local / "README.md").read_text()
    card = ModelCard(text)  # the YAML header still parses
    assert card.data.library_name == "peft"
    assert "<script>" not in text and "<b>" not in text and "\n## injected" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    for line in text.splitlines():
        if line.startswith("|"):
            cells = unescaped_pipes(line)
            assert cells == unescaped_pipes(table_header(text, line)), line  # every row as wide as its header
    row = next(line for line in text.splitlines() if line.startswith("| 1 | `task-01`"))
    assert markdown_text(HOSTILE) in row and "x&#124;y" in row
    assert "T1 " + markdown_text(HOSTILE) in text  # the accuracy matrix's header
    assert "| 1 | 75.0 | 75.0 |" in text
    assert markdown_text("a|b\nc") == "a&#124;b c" and markdown_text("<&>`") == "&lt;&amp;&gt;&#96;"


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def table_header(text: str, row: str) -> str:
    lines = text.splitlines()
    index = lines.index(row)
    while index > 0 and lines[index - 1].startswith("|"):
        index -= 1
    return lines[index]


@pytest.mark.parametrize("bad", [5.0, -1, math.nan, math.inf, "0.9", True])
def test_accuracies_out_of_range_are_refused_before_anything_is_written(tmp_path, bad):
    model = finished_task(tmp_path)
    local = tmp_path / "local"
    with pytest.raises(ValueError, match=re.escape(f"accuracy_matrix[0][0] = {bad!r}")):
        save_task(model, str(local), accuracy_matrix=[[bad]])
    assert not local.exists()
    assert peft_gp.get_task_state(model).accuracy_matrix is None  # nor recorded


# ---- 8. the large-file (LFS) path ----------------------------------------------------------------------------------


@pytest.fixture
def lfs_hub(hub_env):
    """A fake Hub whose LFS threshold (12 kB) puts the adapter weights and the memory (about 35 and 15 kB) on LFS."""
    with serving_fake_hub(hub_env, lfs_threshold=12 * 1024) as server:
        yield server


@pytest.mark.parametrize("chunk", [None, 8 * 1024], ids=["one-put", "multipart"])
def test_memory_above_the_lfs_threshold_is_pushed_and_loaded_back(lfs_hub, tmp_path, chunk):
    lfs_hub.lfs_chunk_size = chunk
    model = finished_task(tmp_path)
    local = tmp_path / "local"
    push_task_to_hub(model, REPO, local_dir=str(local))
    memory_bytes = (local / "gp_memory.safetensors").read_bytes()
    assert len(memory_bytes) >= lfs_hub.lfs_threshold
    assert set(lfs_hub.lfs_paths(REPO, "task-01")) == {"adapter_model.safetensors", "gp_memory.safetensors"}
    assert lfs_hub.files(REPO, "task-01")["gp_memory.safetensors"] == memory_bytes
    assert lfs_hub.calls("POST", ".git/info/lfs/objects/batch") and lfs_hub.calls("POST", "/lfs/objects/verify")
    puts = lfs_hub.calls("PUT", "/upload/", server="storage")
    sizes = [len(memory_bytes), (local / "adapter_model.safetensors").stat().st_size]
    assert len(puts) == (2 if chunk is None else sum(math.ceil(size / chunk) for size in sizes))  # parts of 8 kB
    assert all("authorization" not in r.headers for r in lfs_hub.requests if r.server == "storage")

    loaded = peft_gp.from_pretrained(tiny_bert(), REPO, revision="task-01")
    assert lfs_hub.calls("GET", "/objects/", server="storage")  # served back from the LFS storage
    memory, loaded_memory = peft_gp.get_memory(model), peft_gp.get_memory(loaded)
    assert set(loaded_memory.bases) == set(memory.bases)
    for name, basis in memory.bases.items():
        assert loaded_memory.bases[name].equal(basis), name


class NoSleep:
    """``time`` for huggingface_hub's retries, without the waits (1 + 2 + 4 + 8 + 8 seconds)."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(_seconds) -> None:
        return None


def test_lfs_upload_cut_off_half_way_then_retried_from_the_folder(lfs_hub, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(_http, "time", NoSleep())
    model = finished_task(tmp_path)
    local = tmp_path / "local"
    lfs_hub.fail_lfs_uploads = 1_000  # every attempt (huggingface_hub retries 5 times) is cut off mid-body
    with pytest.raises(GPHubError, match=r"connection broke off.*Error while uploading '[\w.]+' to the Hub") as raised:
        push_task_to_hub(model, REPO, local_dir=str(local))
    assert "push_task_folder" in str(raised.value) and raised.value.local_dir == str(local)
    assert_token_hidden(raised.value, caplog)
    assert lfs_hub.calls("PUT", "/upload/", server="storage") and not lfs_hub.lfs_objects
    assert "task-01" not in lfs_hub.repos[REPO].refs and len(lfs_hub.messages(REPO)) == 1  # no commit
    saved = tree(local)
    assert peft_gp.get_memory(peft_gp.from_pretrained(tiny_bert(), str(local))).tasks_seen == 1  # intact

    lfs_hub.fail_lfs_uploads = 0
    push = push_task_folder(str(local), REPO)
    assert push.revision == "task-01" and tree(local) == saved
    files = lfs_hub.files(REPO, "task-01")
    for name in ("adapter_model.safetensors", "gp_memory.safetensors", "gp_tasks.json", "adapter_config.json"):
        assert files[name] == saved[name], name

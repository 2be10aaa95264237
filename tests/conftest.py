"""Fixtures of the test suite (the helpers themselves live in ``tests/testing.py``)."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState

from .testing import CASES, TOKEN, Case, save_tiny_text_model, serving_fake_hub, text_dataset


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request) -> Case:
    return request.param


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """``model`` (``save_tiny_text_model``) and ``data`` (``text_dataset()``) in a folder of the module's own."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_text_model(root / "model")
    text_dataset().save_to_disk(str(root / "data"))
    return root


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online, with ``HF_TOKEN`` set to ``TOKEN`` and every Hub cache and token path under ``tmp_path``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_saved_token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake Hub speaks LFS, not Xet
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return monkeypatch


@pytest.fixture
def hub(hub_env):
    """The fake Hub on 127.0.0.1, with ``huggingface_hub`` pointed at it; it fails the test on a request it lacks."""
    with serving_fake_hub(hub_env) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide ``AcceleratorState``: a ``Trainer`` with ``bf16=True`` left bf16 autocast on
    for a later test's plain ``Accelerator(cpu=True)`` (test_accelerate_loop failed after test_trainer). Reset it."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)

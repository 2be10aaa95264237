"""Damaged memory files, saves killed half-way, and what peft_gp never reads or writes."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_gp import GPMemoryError
from peft_gp.wiring.memory import GPMemory

ROOT = Path(__file__).resolve().parents[1]


def valid_memory_bytes() -> bytes:
    memory = GPMemory(dims={"layer.lora_A": 6, "head": 4})
    generator = torch.Generator().manual_seed(0)
    memory.update(
        {
            name: (lambda x: x.T @ x)(torch.randn(5, dim, generator=generator, dtype=torch.float64))
            for name, dim in memory.dims.items()
        },
        0.9,
    )
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "gp_memory.safetensors"
        memory.save(str(target))
        return target.read_bytes()


VALID = valid_memory_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(0, len(VALID)),
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), max_size=4),
)
def test_damaged_files_load_or_fail_with_a_memory_error(tmp_path, cut, flips):
    data = bytearray(VALID[:cut])
    for position, xor in flips:
        if position < len(data):
            data[position] ^= xor
    path = tmp_path / "gp_memory.safetensors"
    path.write_bytes(bytes(data))
    try:
        memory = GPMemory.load(str(path))
    except GPMemoryError as error:
        assert str(path) in str(error)  # names the file
        return
    # whatever loaded passed every check: finite orthonormal float32 bases of the recorded shapes
    for name, basis in memory.bases.items():
        assert basis.dtype == torch.float32 and basis.shape[0] == memory.dims[name]
        assert torch.isfinite(basis).all()


SAVER = """
import sys, torch
from peft_gp.wiring.memory import GPMemory
path = sys.argv[1]
memory = GPMemory(dims={"big": 512})
generator = torch.Generator().manual_seed(0)
step = 0
while True:
    x = torch.randn(64, 512, generator=generator, dtype=torch.float64)
    memory.update({"big": x.T @ x}, 0.99)
    memory.save(path)
    step += 1
    if step == 1:
        print("saved", flush=True)
"""


def test_a_save_killed_half_way_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "gp_memory.safetensors"
    for attempt in range(2):  # each start imports peft/transformers (seconds): two kills at different moments
        process = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, cwd=ROOT)
        assert process.stdout.readline().strip() == b"saved"
        time.sleep(0.05 + 0.1 * attempt)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        memory = GPMemory.load(str(path))  # the last complete save, never a torn one
        assert memory.bases["big"].shape[0] == 512 and memory.tasks_seen >= 1


@pytest.mark.parametrize("forbidden", ["torch.load", "pickle", "trust_remote_code", "weights_only=False"])
def test_only_safetensors_are_read_and_no_remote_code(forbidden):
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "peft_gp").rglob("*.py") if forbidden in p.read_text()]
    assert offenders == []

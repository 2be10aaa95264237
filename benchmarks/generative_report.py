"""The tables, targets and shard merging of ``smollm2_generative.py`` (means over seeds, per-seed values)."""

from __future__ import annotations

import statistics
from pathlib import Path

from common import RESULTS, benchmark_record, load_text, read_shards, write_record

BENCHMARK = "smollm2_generative"
COLUMNS = (("average_accuracy", "final avg exact match", 100.0), ("forgetting", "forgetting", 100.0),
           ("backward_transfer", "BWT", 100.0), ("perplexity_rise", "ppl rise", 1.0))  # fmt: skip
SHARD_KEYS = ("methods", "seeds", "output", "merge", "quick")  # settings that may differ between shards


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarise(runs: dict) -> dict:
    """``{method: {metric: [mean, std], "train_seconds": [..], "memory_file_bytes": mean | None, "seeds": n}}``."""
    summary = {}
    for method, per_seed in runs.items():
        if not per_seed:
            continue
        entry = {key: _mean_std([r["metrics"][key] for r in per_seed]) for key, _, _ in COLUMNS}
        entry["perplexity_final"] = _mean_std([r["metrics"]["perplexity_final"] for r in per_seed])
        entry["train_seconds"] = _mean_std([r["train_seconds"] for r in per_seed])
        sizes = [r["memory_file_bytes"] for r in per_seed]
        entry["memory_file_bytes"] = None if None in sizes else statistics.fmean(sizes)
        entry.update(seeds=[r["seed"] for r in per_seed], label=per_seed[0]["label"])
        summary[method] = entry
    return summary


def _check(target: str, method: str, value: float | None, needed: str, met: bool, why: str) -> dict:
    return {"target": target, "method": method, "value": value, "needed": needed, "met": met, "why": why}


def targets(summary: dict) -> list[dict]:
    """Issue 17's targets on the means: GP-LoRA (and, for reference, GP-LoRA + reference) against plain and OSF."""
    checks = []
    plain, osf = summary.get("plain"), summary.get("osf")
    for method in ("gp", "gp_reference"):
        gp = summary.get(method)
        if gp is None:
            continue
        if plain is not None:
            f_plain, f_gp = plain["forgetting"][0], gp["forgetting"][0]
            share = f_gp / f_plain if f_plain > 0 else None
            checks.append(_check("forgetting <= 20% of plain LoRA's", method, share, "<= 0.20",
                                 share is not None and share <= 0.2,
                                 f"forgetting {100 * f_gp:.1f} vs plain {100 * f_plain:.1f} points"
                                 + ("" if f_plain > 0 else " (plain LoRA did not forget: no ratio)")))  # fmt: skip
            delta = 100 * (gp["average_accuracy"][0] - plain["average_accuracy"][0])
            checks.append(_check("final average >= plain LoRA's", method, delta, ">= 0 points", delta >= 0,
                                 f"{100 * gp['average_accuracy'][0]:.1f} vs {100 * plain['average_accuracy'][0]:.1f}"))
        if osf is not None:
            ours, theirs = 100 * gp["average_accuracy"][0], 100 * osf["average_accuracy"][0]
            checks.append(_check("final average ahead of OSF", method, ours - theirs, "> 0 points", ours > theirs,
                                 f"{ours:.1f} vs OSF {theirs:.1f}"))
    reference = summary.get("gp_reference")
    if reference is not None and plain is not None:
        r_plain, r_ref = plain["perplexity_rise"][0], reference["perplexity_rise"][0]
        share = r_ref / r_plain if r_plain > 0 else None
        checks.append(_check("ppl rise <= 50% of plain LoRA's", "gp_reference", share, "<= 0.50",
                             share is not None and share <= 0.5,
                             f"rise {r_ref:+.2f} vs plain {r_plain:+.2f}"
                             + ("" if r_plain > 0 else " (plain LoRA's perplexity did not rise)")))  # fmt: skip
    return checks


def _cell(pair: list[float], scale: float, signed: bool = False) -> str:
    mean = f"{scale * pair[0]:+.1f}" if signed else f"{scale * pair[0]:.1f}"
    return f"{mean} ± {scale * pair[1]:.1f}"


def table(summary: dict) -> str:
    """Markdown: one row per method, mean ± sample std over seeds."""
    lines = ["| method | " + " | ".join(name for _, name, _ in COLUMNS) + " | train time (s) | memory file (MiB) |",
             "|---" * (len(COLUMNS) + 3) + "|"]  # fmt: skip
    for entry in summary.values():
        cells = [_cell(entry[key], scale, signed=key in ("backward_transfer", "perplexity_rise"))
                 for key, _, scale in COLUMNS]  # fmt: skip
        size = "–" if entry["memory_file_bytes"] is None else f"{entry['memory_file_bytes'] / 2**20:.1f}"
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + f" | {entry['train_seconds'][0]:.0f} | {size} |")
    return "\n".join(lines)


def seed_table(runs: dict) -> str:
    """Markdown: the per-seed values behind the means."""
    lines = ["| method | seed | final avg exact match | forgetting | BWT | ppl before -> after | train time (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for per_seed in runs.values():
        for r in per_seed:
            m = r["metrics"]
            lines.append(f"| {r['label']} | {r['seed']} | {100 * m['average_accuracy']:.1f} | "
                         f"{100 * m['forgetting']:.1f} | {100 * m['backward_transfer']:+.1f} | "
                         f"{m['perplexity_before']:.2f} -> {m['perplexity_final']:.2f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def report(runs: dict, streams: dict, bases: dict, settings: dict, total: float, load_start: float | None = None,
           shards: list | None = None) -> dict:  # fmt: skip
    """Print the tables and targets; the JSON record."""
    summary = summarise(runs)
    checks = targets(summary)
    print("\n" + table(summary) + "\n\n" + seed_table(runs))
    print("\ntargets (issue 17, means over seeds):")
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        print(f"  {c['method']:13s} {c['target']:<36s} {value:>7s} (needs {c['needed']}): "
              f"{'met' if c['met'] else 'NOT met'} - {c['why']}")  # fmt: skip
    if load_start is not None:
        print(f"\ntotal {total:.0f}s; {load_text(load_start)}")
    record = benchmark_record(BENCHMARK, load_start, total, settings, streams=streams, base_model=bases,
                              summary=summary, targets=checks, runs=runs)  # fmt: skip
    if shards is not None:
        record["shards"] = shards
    return record


def merge(paths: list[str], output: str | None) -> dict:
    """One record from shard records (one per method and seed, say): the same settings and streams are required."""
    shards = read_shards(paths)
    reference_path, reference = shards[0]
    runs: dict = {}
    streams: dict = {}
    bases: dict = {}
    for path, shard in shards:
        if shard.get("benchmark") != BENCHMARK:
            raise SystemExit(f"--merge: {path} is not a record of {BENCHMARK}")
        mine, first = shard["settings"], reference["settings"]
        differ = sorted(k for k in set(mine) | set(first) if k not in SHARD_KEYS and mine.get(k) != first.get(k))
        if differ:
            raise SystemExit(f"--merge: {path} and {reference_path} differ in {differ}: merge only like with like")
        for seed, stream in shard["streams"].items():
            if streams.setdefault(seed, stream) != stream:
                raise SystemExit(f"--merge: seed {seed} has different task streams in {path}")
            bases.setdefault(seed, shard["base_model"][seed])
        for method, per_seed in shard["runs"].items():
            for run in per_seed:
                if any(r["seed"] == run["seed"] for r in runs.get(method, [])):
                    raise SystemExit(f"--merge: {method} seed {run['seed']} appears twice ({path})")
                runs.setdefault(method, []).append(run)
    order = [m for m in ("plain", "gp", "gp_reference", "osf") if m in runs]
    runs = {m: sorted(runs[m], key=lambda r: r["seed"]) for m in order}
    meta = [{"file": Path(p).name, "date": s["date"], "machine": s.get("machine"), "total_seconds": s["total_seconds"],
             "methods": s["settings"].get("methods"), "seeds": s["settings"].get("seeds")} for p, s in shards]
    settings = {k: v for k, v in reference["settings"].items() if k not in SHARD_KEYS}  # the shards' own: in meta
    settings.update(methods=",".join(order), seeds=",".join(sorted(streams, key=int)))
    record = report(runs, streams, bases, settings, sum(s["total_seconds"] for _, s in shards), shards=meta)
    write_record(output or RESULTS / f"{BENCHMARK}.json", record)
    return record

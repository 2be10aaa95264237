"""What the memory costs: update time against samples and hidden size, the size of ``gp_memory.safetensors``, and
peak process memory of GP-LoRA training against plain LoRA.

What it measures
    Random-weight BERT encoders (``--layers`` layers, hidden size d, 4d feed-forward, d/64 heads, sequence length
    ``--max-length``, random token ids; weights do not change the cost) with LoRA r=8 on query/value, as
    ``GPLoraConfig`` (tau = ``--gp-threshold``). For each point the memory is updated twice (two tasks of different
    random inputs; the second update merges into a non-empty basis) and the second update is timed, split into

    * forward: the plain forward passes over the same samples (eval mode, no hooks): what any method pays to look
      at the data once;
    * GP's own work: the rest (feature hooks, float64 Gram matrices, eigendecompositions, merging), i.e.
      ``update_memory`` minus forward.

    Two sweeps: samples per update (``--samples``) at the reference hidden size, and hidden size (``--hidden``) at
    the reference sample count. For every hidden size, the sizes of ``gp_memory.safetensors`` and
    ``adapter_model.safetensors`` after ``save_pretrained`` (two tasks stored). Peak memory: one child process per
    method and hidden size builds the model, (GP: stores two tasks,) then trains ``--peak-steps`` AdamW steps (GP with
    the projection active) and reports its peak resident set size (``ru_maxrss``); the ratio GP / plain compares
    the two processes, which load the same libraries.

    Per paradigm (``--paradigms``), at the reference hidden size and sample count: the same update timing, file
    sizes and peak-memory pair for LoRA, the bottleneck adapter (16 wide, beside each FFN), prefix tuning (keys
    protected) and prompt tuning (10 virtual tokens each). Plain LoRA and prompt tuning are PEFT's own configs; the
    adapter and prefix baselines are peft_gp's configs without a memory (PEFT has no bottleneck adapter, and its
    prefix tuning does not run on BERT-like encoders with transformers 5). ``--skip-sweeps`` runs only this table.

How to run (from the repository root; about 3 minutes on 2 CPU cores, longer under load)::

    .venv/bin/python benchmarks/memory_scaling.py
    .venv/bin/python benchmarks/memory_scaling.py --skip-sweeps \
        --output benchmarks/results/memory_scaling_paradigms.json     # the per-paradigm table only
    .venv/bin/python benchmarks/memory_scaling.py --quick     # tiny sizes, peak memory for one size only

Results: a table per sweep and one per paradigm, JSON to ``benchmarks/results/memory_scaling.json``.
"""

from __future__ import annotations

# ruff: noqa: E402 - common.environment() sets the environment before torch and transformers load
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import begin, benchmark_record, environment, load_text, quiet, use_preset, write_record

environment()

import argparse
import copy
import json
import resource
import subprocess
import tempfile
import time

import torch
from peft import LoraConfig, PromptTuningConfig
from transformers import BertConfig, BertForSequenceClassification

import peft_gp
from peft_gp.continual.paradigms import build_peft_model

FULL = dict(samples="64,128,256,512", hidden="128,256,384,768", reference_hidden=384, reference_samples=256,
            layers=6, max_length=64, batch_size=32, peak_steps=10)  # fmt: skip
QUICK = dict(samples="8,16", hidden="32,64", reference_hidden=32, reference_samples=16, layers=2, max_length=12,
             batch_size=8, peak_steps=2)  # fmt: skip
VOCAB = 1000
PARADIGMS = ("lora", "adapter", "prefix", "prompt")
VIRTUAL_TOKENS = 10  # prefix and prompt tuning


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--samples", default=None, help="comma-separated samples per update (64,128,256,512)")
    parser.add_argument("--hidden", default=None, help="comma-separated hidden sizes, multiples of 32 (128,...,768)")
    parser.add_argument("--reference-hidden", type=int, default=None, help="hidden size of the samples sweep (384)")
    parser.add_argument("--reference-samples", type=int, default=None, help="samples of the hidden sweep (256)")
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (6)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (64)")
    parser.add_argument("--batch-size", type=int, default=None, help="(32)")
    parser.add_argument("--peak-steps", type=int, default=None, help="training steps of the peak-memory runs (10)")
    parser.add_argument("--gp-threshold", type=float, default=0.97)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON record (default benchmarks/results/memory_scaling.json)")
    parser.add_argument("--paradigms", default=",".join(PARADIGMS),
                        help=f"comma-separated, of {PARADIGMS}: the per-paradigm table (empty: none)")  # fmt: skip
    parser.add_argument("--skip-sweeps", action="store_true", help="only the per-paradigm table")
    parser.add_argument("--child", choices=("plain", "gp"), help=argparse.SUPPRESS)  # one peak-memory run
    parser.add_argument("--child-hidden", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-paradigm", choices=PARADIGMS, default="lora", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    use_preset(args, "memory_scaling", FULL, QUICK)
    args.paradigm_list = [p.strip() for p in args.paradigms.split(",") if p.strip()]
    unknown = sorted(set(args.paradigm_list) - set(PARADIGMS))
    if unknown:
        raise SystemExit(f"--paradigms takes {', '.join(PARADIGMS)}; got {unknown}")
    args.sample_list = [int(s) for s in str(args.samples).split(",") if s.strip()]
    args.hidden_list = [int(s) for s in str(args.hidden).split(",") if s.strip()]
    bad = [h for h in args.hidden_list + [args.reference_hidden] if h % 32]
    if bad or not args.hidden_list or not args.sample_list:
        raise SystemExit(f"--hidden and --reference-hidden take multiples of 32 (heads of 32 or 64), got {bad}")
    return args


def base_model(hidden: int, args: argparse.Namespace) -> BertForSequenceClassification:
    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                        max_position_embeddings=args.max_length + VIRTUAL_TOKENS, num_labels=4)  # fmt: skip
    return BertForSequenceClassification(config).eval()


def lora_options() -> dict:
    return dict(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])


def paradigm_config(paradigm: str, gp: bool, args: argparse.Namespace, samples: int):
    """The PEFT config of ``paradigm``, GP or plain (adapter and prefix: peft_gp's config, used without a memory)."""
    options = {"gp_threshold": args.gp_threshold, "gp_memory_samples": samples}
    virtual = {"task_type": "SEQ_CLS", "num_virtual_tokens": VIRTUAL_TOKENS}
    if paradigm == "lora":
        return peft_gp.GPLoraConfig(**lora_options(), **options) if gp else LoraConfig(**lora_options())
    if paradigm == "adapter":
        return peft_gp.GPAdapterConfig(task_type="SEQ_CLS", bottleneck_size=16, **options)
    if paradigm == "prefix":
        return peft_gp.GPPrefixTuningConfig(**virtual, **options)
    return peft_gp.GPPromptTuningConfig(**virtual, **options) if gp else PromptTuningConfig(**virtual)


def gp_model(base, args: argparse.Namespace, samples: int, paradigm: str = "lora"):
    torch.manual_seed(args.seed)
    return build_peft_model(copy.deepcopy(base), paradigm_config(paradigm, True, args, samples))


def random_batches(samples: int, args: argparse.Namespace, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (samples, args.max_length), generator=generator)
    return [
        {"input_ids": ids[i : i + args.batch_size], "attention_mask": torch.ones_like(ids[i : i + args.batch_size]),
         "labels": torch.zeros(len(ids[i : i + args.batch_size]), dtype=torch.long)}  # fmt: skip
        for i in range(0, samples, args.batch_size)
    ]


@torch.no_grad()
def forward_seconds(model, batches) -> float:
    model.eval()
    start = time.perf_counter()
    for batch in batches:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return time.perf_counter() - start


def timed_update(base, args: argparse.Namespace, samples: int, paradigm: str = "lora") -> tuple[dict, object]:
    """Two updates (tasks of different random inputs); the second is timed. Returns the row and the model."""
    model = gp_model(base, args, samples, paradigm)
    peft_gp.update_memory(model, random_batches(samples, args, seed=1))
    second = random_batches(samples, args, seed=2)
    forward_seconds(model, second[:1])  # warm caches, as the update's first batch would be
    forward = forward_seconds(model, second)
    start = time.perf_counter()
    report = peft_gp.update_memory(model, second)
    total = time.perf_counter() - start
    dims = [r["dim"] for r in report.values()]
    row = {
        "samples": samples,
        "update_seconds": round(total, 3),
        "forward_seconds": round(forward, 3),
        "gp_own_seconds": round(max(total - forward, 0.0), 3),
        "groups": len(report),
        "largest_dim": max(dims),
        "basis_mean_fill": round(sum(r["basis_size"] / r["dim"] for r in report.values()) / len(report), 4),
    }
    return row, model


def file_sizes(model) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        peft_gp.save_pretrained(model, folder)
        return {name: (Path(folder) / name).stat().st_size
                for name in ("gp_memory.safetensors", "adapter_model.safetensors")}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """One peak-memory run: build, (GP: store two tasks,) train, print the peak RSS in bytes as JSON."""
    quiet()
    base = base_model(args.child_hidden, args)
    samples = args.reference_samples
    if args.child == "gp":
        model = gp_model(base, args, samples, args.child_paradigm)
        for seed in (1, 2):
            peft_gp.update_memory(model, random_batches(samples, args, seed=seed))
    else:
        torch.manual_seed(args.seed)
        model = build_peft_model(base, paradigm_config(args.child_paradigm, False, args, samples))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if args.child == "gp":
        assert peft_gp.GPProjector(model).attach(optimizer).active
    batches = random_batches(args.batch_size * args.peak_steps, args, seed=3)
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_rss(method: str, hidden: int, args: argparse.Namespace, paradigm: str = "lora") -> int:
    command = [sys.executable, __file__, "--child", method, "--child-hidden", str(hidden),
               "--child-paradigm", paradigm,
               "--reference-samples", str(args.reference_samples), "--layers", str(args.layers),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
               "--peak-steps", str(args.peak_steps), "--gp-threshold", str(args.gp_threshold),
               "--seed", str(args.seed)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run {paradigm} {method} d={hidden} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


MIB = 2**20


def sizes(model) -> dict:
    return {f"{k.split('.')[0]}_bytes": v for k, v in file_sizes(model).items()}


def peak_pair(hidden: int, args: argparse.Namespace, paradigm: str = "lora") -> dict:
    plain, gp = peak_rss("plain", hidden, args, paradigm), peak_rss("gp", hidden, args, paradigm)
    return {"peak_rss_plain_bytes": plain, "peak_rss_gp_bytes": gp, "peak_rss_ratio": round(gp / plain, 4)}


def peak_cells(r: dict) -> str:
    if "peak_rss_ratio" not in r:
        return "– | – |"
    return f"{r['peak_rss_plain_bytes'] / MIB:.0f} / {r['peak_rss_gp_bytes'] / MIB:.0f} | {r['peak_rss_ratio']:.3f} |"


def print_sweeps(by_samples: list[dict], by_hidden: list[dict], args: argparse.Namespace) -> None:
    print(f"memory update vs samples (d={args.reference_hidden}, {args.layers} layers, {args.max_length} tokens, "
          "second task):")  # fmt: skip
    print("| samples | update (s) | forward (s) | GP's own (s) | mean basis fill |")
    print("|---|---|---|---|---|")
    for r in by_samples:
        print(f"| {r['samples']} | {r['update_seconds']:.2f} | {r['forward_seconds']:.2f} | {r['gp_own_seconds']:.2f} "
              f"| {100 * r['basis_mean_fill']:.0f}% |")  # fmt: skip
    print(f"\nby hidden size ({args.reference_samples} samples):")
    print("| d | update (s) | forward (s) | GP's own (s) | gp_memory (MiB) | adapter (MiB) "
          "| peak RSS plain / GP (MiB) | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in by_hidden:
        print(f"| {r['hidden']} | {r['update_seconds']:.2f} | {r['forward_seconds']:.2f} | "
              f"{r['gp_own_seconds']:.2f} | {r['gp_memory_bytes'] / MIB:.2f} | {r['adapter_model_bytes'] / MIB:.2f} | "
              + peak_cells(r))


def print_paradigms(by_paradigm: list[dict], args: argparse.Namespace) -> None:
    print(f"\nby paradigm (d={args.reference_hidden}, {args.reference_samples} samples):")
    print("| paradigm | update (s) | forward (s) | GP's own (s) | groups | mean basis fill | gp_memory (MiB) "
          "| adapter (MiB) | peak RSS plain / GP (MiB) | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in by_paradigm:
        print(f"| {r['paradigm']} | {r['update_seconds']:.2f} | {r['forward_seconds']:.2f} | "
              f"{r['gp_own_seconds']:.2f} | {r['groups']} | {100 * r['basis_mean_fill']:.0f}% | "
              f"{r['gp_memory_bytes'] / MIB:.2f} | {r['adapter_model_bytes'] / MIB:.3f} | " + peak_cells(r))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    load_start, began = begin()
    reference = base_model(args.reference_hidden, args)
    by_samples, by_hidden, by_paradigm = [], [], []
    if not args.skip_sweeps:
        by_samples = [timed_update(reference, args, samples)[0] for samples in args.sample_list]
        for hidden in args.hidden_list:
            row, model = timed_update(base_model(hidden, args), args, args.reference_samples)
            row = {"hidden": hidden, **row, **sizes(model)}
            if not args.quick or hidden == args.hidden_list[0]:  # two child processes each: --quick measures one
                row.update(peak_pair(hidden, args))
            by_hidden.append(row)
    for paradigm in args.paradigm_list:
        row, model = timed_update(reference, args, args.reference_samples, paradigm)
        row = {"paradigm": paradigm, **row, **sizes(model)}
        if not args.quick:  # the tests run the children of every paradigm in-process instead
            row.update(peak_pair(args.reference_hidden, args, paradigm))
        by_paradigm.append(row)
    if not args.skip_sweeps:
        print_sweeps(by_samples, by_hidden, args)
    if by_paradigm:
        print_paradigms(by_paradigm, args)
    total = time.perf_counter() - began
    print(f"total {total:.0f}s; {load_text(load_start)}")
    settings = {k: v for k, v in vars(args).items() if not k.startswith("child")}
    record = benchmark_record("memory_scaling", load_start, total, settings, by_samples=by_samples,
                              by_hidden=by_hidden, by_paradigm=by_paradigm)  # fmt: skip
    write_record(args.output, record)
    return record


if __name__ == "__main__":
    main()

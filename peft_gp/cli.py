"""``peft-gp``: continual-learning runs from the command line, on top of ``peft_gp.continual.run_sequence``.

    peft-gp run                                  # the embedded default: MiniLM + BBC News, class-incremental
    peft-gp run configs/fortunes20_cil.yaml --epochs 2 --compare-baseline
    peft-gp config configs/bbc_news_cil.yaml     # print the resolved config as YAML
    peft-gp plan path/to/config.json --r 16 --target-modules all-linear --fill 0.5   # GP's cost, no weights

Every ``RunConfig`` field is a flag (``gp_threshold`` -> ``--gp-threshold``); flags override the YAML file, which
overrides the defaults. Values are read as YAML (``--classes-per-task 2,2,1`` and ``--classes-per-task [2,2,1]`` are
the same list; ``null`` is None). Bad input (an unknown key, a misspelt flag, unknown classes, a model without the
needed head) stops with a message before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .continual.config import RunConfig, RunConfigError, field_names
from .continual.generative_runner import perplexity_markdown
from .continual.report import comparison_text
from .continual.runner import run_sequence
from .plan import GPPlan, PlanError, plan

RAW_STRING_FIELDS = {"name", "model", "label_column", "text_column", "image_column", "scenario", "paradigm",
                     "gp_projection", "gp_modules_to_save", "general_text"}  # fmt: skip
NULLABLE_STRING_FIELDS = {"model", "output_dir", "gp_modules_to_save", "general_text"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_value(name: str, text: str) -> Any:
    """A command-line value as YAML; ``a,b,c`` is a list. Plain string fields stay strings."""
    import yaml

    if name in RAW_STRING_FIELDS or name == "output_dir":
        return None if name in NULLABLE_STRING_FIELDS and text.lower() in ("null", "none") else text
    if "," in text and not text.lstrip().startswith(("[", "{")):
        text = f"[{text}]"
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RunConfigError(f"{_flag(name)}: cannot read {text!r} as a value ({error}).") from error
    return None if isinstance(value, str) and value.lower() == "none" else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-gp", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train a task stream and write the accuracy matrix, summary and plots",
                              allow_abbrev=False)  # fmt: skip
    show = commands.add_parser("config", help="print the resolved run config as YAML", allow_abbrev=False)
    defaults = RunConfig()
    for sub in (run, show):
        sub.add_argument("config", nargs="?", help="YAML file of RunConfig fields (default: the embedded defaults)")
        for field in dataclasses.fields(RunConfig):
            default = getattr(defaults, field.name)
            if isinstance(default, bool):
                sub.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=None,
                                 help=f"(default {default})")  # fmt: skip
            else:
                sub.add_argument(_flag(field.name), metavar="VALUE", default=None, help=f"(default {default!r})")
    add_plan_parser(commands)
    return parser


def add_plan_parser(commands) -> None:
    """``peft-gp plan CONFIG``: the options of ``peft_gp.plan.plan``."""
    sub = commands.add_parser("plan", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="what GP costs on a model, from its config alone (no weights): file sizes, "
                              "memory-update peak, projection FLOPs",
                              description="Build the model on the meta device from its config, wire the GP adapter "
                              "as for training, and print per layer and in total: adapter size, gp_memory.safetensors "
                              "size (worst case and at --fill), the memory update's float64 Gram matrices and peak, "
                              "and the projection's FLOPs per optimizer step. Sizes in decimal units (1 GB = 1e9 B).")
    sub.add_argument("config", help="the model's config.json, a folder holding one, or a Hub model id")
    sub.add_argument("--paradigm", default="lora", help="lora, adapter, prefix or prompt (default lora)")
    sub.add_argument("--r", type=int, default=None, help="LoRA rank (default 8)")
    sub.add_argument("--target-modules", default=None,
                     help="LoRA targets: all-linear, or names separated by commas (default: PEFT's for the model)")
    sub.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="another argument of the paradigm's config, read as YAML (e.g. bottleneck_size=16)")
    sub.add_argument("--task-type", default="auto",
                     help="CAUSAL_LM, SEQ_CLS, TOKEN_CLS, SEQ_2_SEQ_LM or none (default: from the config's "
                     "architectures)")
    sub.add_argument("--gp-threshold", type=float, default=0.97, help="(default 0.97)")
    sub.add_argument("--gp-projection", default="update", help="update or gradient (default update)")
    sub.add_argument("--fill", default="0.5", help="share of each basis assumed filled, in [0, 1] (default 0.5); "
                     "the worst case (1) is always printed too")
    sub.add_argument("--per-layer", action="store_true", help="one row per layer (default: identical layers as one)")
    sub.add_argument("--json", action="store_true", help="print the plan as JSON")  # fmt: skip


def resolve_config(args: argparse.Namespace) -> RunConfig:
    overrides = {}
    for name in field_names():
        value = getattr(args, name, None)
        if value is None:
            continue
        overrides[name] = value if isinstance(value, bool) else parse_value(name, value)
    if args.config:
        return RunConfig.from_yaml(args.config, overrides)
    return RunConfig.from_dict(overrides, source="the command line")


def _unknown_flags(parser: argparse.ArgumentParser, unknown: list[str], command: str = "run") -> None:
    flags = [_flag(name) for name in field_names()] if command != "plan" else PLAN_FLAGS
    for item in unknown:
        if item.startswith("-"):
            close = difflib.get_close_matches(item.split("=")[0], flags, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]}?" if close else f" See peft-gp {command} --help."
            parser.error(f"unknown option {item}.{hint}")
    parser.error(f"unexpected arguments {unknown}: give at most one config file.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_flags(parser, unknown, args.command)
    if args.command == "plan":
        return run_plan(parser, args)
    try:
        config = resolve_config(args)
    except RunConfigError as error:
        parser.exit(2, f"peft-gp: error: {error}\n")
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    # peft 0.21 calls a property transformers 5 deprecated, inside get_peft_model: not the user's to fix
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    try:
        run = run_sequence(config)
    except RunConfigError as error:
        parser.exit(2, f"peft-gp: error: {error}\n")
    print()
    print(comparison_text(run))
    if config.scenario == "generative":
        print(perplexity_markdown(run))
    print()
    for kind, path in run.paths.items():
        print(f"{kind:>13}: {path}")
    return 0


PLAN_FLAGS = ["--paradigm", "--r", "--target-modules", "--option", "--task-type", "--gp-threshold", "--gp-projection",
              "--fill", "--per-layer", "--json"]  # fmt: skip


def run_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``peft-gp plan``: build the plan and print it (a table, or JSON with ``--json``)."""
    try:
        fill = float(args.fill)
    except ValueError:
        parser.exit(2, f"peft-gp: error: --fill must be a number in [0, 1] (share of each basis filled), got "
                    f"{args.fill!r}.\n")  # fmt: skip
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.exit(2, f"peft-gp: error: --option takes KEY=VALUE (e.g. bottleneck_size=16), got {item!r}.\n")
        options[key.strip()] = parse_value(key.strip(), value)
    if args.r is not None:
        options["r"] = args.r
    if args.target_modules is not None:
        targets = [name.strip() for name in args.target_modules.split(",") if name.strip()]
        options["target_modules"] = targets[0] if targets == ["all-linear"] else targets
    task_type = None if args.task_type.lower() in ("none", "null") else args.task_type
    gp = {"gp_threshold": args.gp_threshold, "gp_projection": args.gp_projection}
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        result = plan(args.config, args.paradigm, fill, task_type=task_type, gp=gp, **options)
    except PlanError as error:
        parser.exit(2, f"peft-gp: error: {error}\n")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(plan_text(result, per_layer=args.per_layer))
    return 0


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def plan_text(result: GPPlan, per_layer: bool = False) -> str:
    """The plan as a markdown table per layer (identical layers as one row unless ``per_layer``) and totals."""
    fill = "the given fills" if result.fill is None else f"fill {result.fill:g}"
    sizes = {k: v for k, v in result.peft_config.items() if k in ("r", "bottleneck_size", "num_virtual_tokens")}
    targets = result.peft_config.get("target_modules")
    lines = [f"peft-gp plan: {result.source} ({result.model_type}, {result.task_type or 'bare model'}), "
             f"{result.paradigm} {json.dumps(sizes)}{f' on {targets}' if targets else ''}, "
             f"gp_projection={result.gp_projection}; {fill} (full: every basis full; worst: the memory file at its "
             "largest, every basis half full). 'shared': the layer shares the basis and Gram of an earlier one that "
             "reads the same input. Sizes in decimal units.", "",
             f"| layer | × | basis dims | adapter params | memory, worst | memory, {fill} | update Grams (float64) "
             f"| projection GFLOP/step, full | at {fill} |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rows: dict = {}
    for layer in result.layers:
        name = layer.name if per_layer else re.sub(r"\.\d+(?=\.|$)", ".*", layer.name)
        dims = [f"{dim} shared" if group in layer.shared else str(dim) for group, dim in zip(layer.groups, layer.dims)]
        values = (tuple(dims), layer.adapter_params, layer.memory_bytes_worst, layer.memory_bytes,
                  layer.gram_bytes, layer.projection_flops_full, layer.projection_flops)  # fmt: skip
        rows.setdefault((name, values), []).append(layer)
    for (name, (dims, params, worst, at_fill, grams, flops_full, flops)), layers in rows.items():
        lines.append(f"| {name} | {len(layers)} | {', '.join(dims)} | {params:,} | {_size(worst)} | "
                     f"{_size(at_fill)} | {_size(grams)} | {flops_full / 1e9:.3g} | {flops / 1e9:.3g} |")  # fmt: skip
    r = result
    lines += ["", "Totals:",
              f"- adapter: {r.adapter_params:,} parameters; adapter_model.safetensors {_size(r.adapter_file_bytes)}",
              f"- gp_memory.safetensors: {_size(r.memory_file_bytes_worst)} worst case (every basis half full), "
              f"{_size(r.memory_file_bytes)} at {fill}, {_size(r.memory_file_bytes_full)} with every basis full "
              "(float32, the smaller of each basis and its complement)",
              f"- memory update: {_size(r.update_gram_bytes)} of float64 Gram matrices in "
              f"{r.update_passes} pass(es) over the sample, at most {_size(r.update_pass_gram_bytes)} per pass "
              "(twice that while a batch's Grams are added); "
              f"peak about {_size(r.update_peak_bytes_full)} with every basis full, {_size(r.update_peak_bytes)} at "
              f"{fill} (a pass's Grams + its widest decomposition + its new bases; an estimate)",
              f"- projection per optimizer step: {r.projection_flops_full / 1e9:,.1f} GFLOP with every basis full, "
              f"{r.projection_flops / 1e9:,.1f} GFLOP at {fill} ({r.gp_projection} mode)",
              f"- bases held on the training device (float32): {_size(r.device_basis_bytes_full)} with every basis "
              f"full, {_size(r.device_basis_bytes)} at {fill}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

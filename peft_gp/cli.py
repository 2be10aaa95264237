"""``peft-gp``: continual-learning runs from the command line, on top of ``peft_gp.continual.run_sequence``.

    peft-gp run                                  # the embedded default: MiniLM + BBC News, class-incremental
    peft-gp run configs/fortunes20_cil.yaml --epochs 2 --compare-baseline
    peft-gp config configs/bbc_news_cil.yaml     # print the resolved config as YAML

Every ``RunConfig`` field is a flag (``gp_threshold`` -> ``--gp-threshold``); flags override the YAML file, which
overrides the defaults. Values are read as YAML (``--classes-per-task 2,2,1`` and ``--classes-per-task [2,2,1]`` are
the same list; ``null`` is None). Bad input (an unknown key, a misspelt flag, unknown classes, a model without the
needed head) stops with a message before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .continual.config import RunConfig, RunConfigError, field_names
from .continual.generative_runner import perplexity_markdown
from .continual.report import comparison_text
from .continual.runner import run_sequence

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
    return parser


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


def _unknown_flags(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    flags = [_flag(name) for name in field_names()]
    for item in unknown:
        if item.startswith("-"):
            close = difflib.get_close_matches(item.split("=")[0], flags, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]}?" if close else " See peft-gp run --help."
            parser.error(f"unknown option {item}.{hint}")
    parser.error(f"unexpected arguments {unknown}: give at most one config file.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_flags(parser, unknown)
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


if __name__ == "__main__":
    sys.exit(main())

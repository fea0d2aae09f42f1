"""What every `dpsnr` command does before its work: read a recipe and the flags into typed dataclasses.

    dpsnr <command> --config recipe.yaml --key value ...

A recipe is a YAML (or JSON) mapping of argument names to values. It sets the defaults; flags on
the command line override them; a key no dataclass has is an error naming it, so a typo never
trains with a default silently. Parsing is `transformers.HfArgumentParser`: every field of the
dataclasses is a flag (`--max_length` and `--max-length` alike) with its type and help text.

The lowest layer of the `dpsnr` package: training, evaluation and the CLI all parse with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

RECIPE_FLAG = "--config"


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping in a recipe file (.json as JSON, anything else as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of argument names to values, got {type(values).__name__}")
    return values


def parse_dataclasses(types: tuple[type, ...], argv: list[str] | None = None, description: str | None = None) -> tuple:
    """`--config recipe.yaml` (defaults) plus command-line flags (overrides) into one instance of each
    dataclass in `types`. A dataclass may have a `config` field of its own (it then holds the path)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(types, description=description)
    names = {f.name for t in types for f in dataclasses.fields(t)}
    if "config" not in names:
        parser.add_argument(RECIPE_FLAG, default=None, metavar="RECIPE", help="YAML/JSON file of argument values; flags override it.")
    path = _recipe_path(argv)
    if path is not None:
        values = read_recipe(path)
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"recipe {path} has unknown keys: {unknown}; known: {sorted(names)}")
        parser.set_defaults(**values)
        # argparse still demands a required flag that only got a default; the recipe provides it.
        for action in parser._actions:  # argparse keeps its options here (no public accessor)
            if action.dest in values:
                action.required = False
    return tuple(parser.parse_args_into_dataclasses(args=argv)[: len(types)])


def _recipe_path(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(RECIPE_FLAG, default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config


def setup_script_logging() -> None:
    """Show this package's progress (INFO) on the console; other libraries stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("dpsnr").setLevel(logging.INFO)

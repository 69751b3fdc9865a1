"""The one recipe loader: a YAML file plus command-line overrides, parsed by `HfArgumentParser`.

Design decisions:
- A recipe is YAML with free-form sections (`model:`, `data:`, `training:`) whose keys are the
  argument names of Hugging Face's example scripts and of `TrainingArguments`. Sections are only for
  reading; keys are unique across them, so `--KEY VALUE` on the command line overrides any of them.
- Parsing is `HfArgumentParser`'s: the recipe's values become the parser's defaults and the command
  line is parsed on top, so types, `--help` and error messages are the ones Hugging Face users know.
- A key the dataclasses do not know is an error naming the key, not a silently ignored typo.
- `--resume` is shorthand for `--resume_from_checkpoint auto`; `--KEY null` sets a key to None, as in YAML.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser


class RecipeError(ValueError):
    """A recipe or command line that cannot be used, explained in one sentence."""


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML and flatten its sections into one mapping of argument names to values."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found.")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections or keys.")
    flat: dict[str, Any] = {}
    for key, value in document.items():
        entries = value.items() if isinstance(value, dict) else [(key, value)]
        for name, setting in entries:
            if name in flat:
                raise RecipeError(f"recipe {path} sets {name!r} twice.")
            flat[name] = setting
    return flat


def parse_recipe(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None
) -> tuple:
    """Parse `RECIPE.yaml [--KEY VALUE ...]` into instances of `dataclass_types`, in order.

    `defaults` are the entry point's own defaults (e.g. `use_cpu: true`); the recipe overrides them and the
    command line overrides both.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise RecipeError("the first argument must be a recipe YAML file, e.g. recipes/phase1_pretraining.yaml.")
    recipe = read_recipe(argv[0])
    overrides = ["--resume_from_checkpoint" if arg == "--resume" else arg for arg in argv[1:]]
    if "--resume_from_checkpoint" in overrides:
        position = overrides.index("--resume_from_checkpoint")
        if position + 1 == len(overrides) or overrides[position + 1].startswith("--"):
            overrides.insert(position + 1, "auto")

    parser = HfArgumentParser(dataclass_types)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(f"recipe {argv[0]} has unknown keys: {', '.join(unknown)}.")
    parser.set_defaults(**{**(defaults or {}), **recipe})
    # Required arguments that the recipe already provides are no longer required on the command line.
    for action in parser._actions:
        if action.dest in recipe:
            action.required = False
    parsed, leftover = parser.parse_known_args(overrides)
    if leftover:
        raise RecipeError(f"unknown command-line arguments: {' '.join(leftover)}.")
    outputs = []
    for dtype in dataclass_types:
        names = {field for field in dtype.__dataclass_fields__ if dtype.__dataclass_fields__[field].init}
        values = {name: value for name, value in vars(parsed).items() if name in names}
        # `--KEY null` on the command line means what `KEY: null` means in YAML.
        values = {name: None if value in ("null", "None") else value for name, value in values.items()}  # "none" is report_to's own word
        outputs.append(dtype(**values))
    return tuple(outputs)

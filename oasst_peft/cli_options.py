"""What the ``oasst-peft`` commands share: argument types, parse-time checks, and turning a recipe argument
into a validated Recipe. Imports nothing heavy (no torch), so ``--help`` and recipe errors stay instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

RecipeArg = Annotated[
    Path, typer.Argument(help="recipe YAML file, or a shipped recipe's name", show_default=False)
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a recipe key by dotted path, e.g. --set peft.r=32")
]


ModelArg = Annotated[str, typer.Argument(help="a training run, a merged model dir, an adapter dir or a base")]
AdapterOpt = Annotated[
    Path | None, typer.Option(help="LoRA adapter to apply on MODEL (when MODEL is a base)")
]
Dtype = Literal["fp16", "bf16", "fp32"]
SAMPLING_NAMES = ("greedy", "typical", "nucleus", "beam")  # sample.SAMPLING_CONFIGS, without importing torch


TEMPLATE_CHOICES = ("saved", "oasst")


def template_choice(value: str | None) -> str | None:
    if value is not None and value not in TEMPLATE_CHOICES:
        raise typer.BadParameter(
            f"'{value}' is not saved (the model's own template) or oasst (the Open-Assistant one)"
        )
    return value


def known_configs(values: list[str] | None) -> list[str] | None:
    for v in values or []:
        if v not in SAMPLING_NAMES:
            raise typer.BadParameter(f"'{v}' is not one of {', '.join(SAMPLING_NAMES)}")
    return values


def above_zero(value: float) -> float:
    if not value > 0:  # (NaN too)
        raise typer.BadParameter(f"must be > 0 (got {value})")
    return value


def say(line: str) -> None:
    typer.echo(line)


def recipe_from(path: Path, overrides: list[str] | None):
    from oasst_peft.config import load_recipe

    return load_recipe(path, overrides or [])  # a path wins over a shipped recipe's name

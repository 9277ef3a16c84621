"""The ``oasst-peft`` commands that only look: ``data stats|preview``, ``plan`` and ``recipes`` (list, copy).

``oasst_peft.cli`` registers them on the main app; each imports its library code when it runs.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from oasst_peft.cli_options import RecipeArg, SetOpt, above_zero, recipe_from, say

data_app = typer.Typer(
    no_args_is_help=True,
    help="Inspect a recipe's data mix before training.\n\nExample: oasst-peft data stats demo-smollm2",
)
recipes_app = typer.Typer(
    help="The shipped recipes: list them, or copy one to edit.\n\nExample: oasst-peft recipes copy demo-smollm2 mine.yaml"
)


def _tokenized(r, as_json: bool = False):
    from oasst_peft.data.prepare import prepare_data
    from oasst_peft.model import load_tokenizer

    tokenizer, _ = load_tokenizer(r)
    notes = (lambda line: typer.echo(line, err=True)) if as_json else say  # stdout stays pure JSON
    tokenized, _ = prepare_data(r, tokenizer, say=notes)
    return tokenizer, tokenized


@data_app.command("stats")
def data_stats(
    recipe: RecipeArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Per dataset and split: conversations, turns, tokens, trained tokens, truncated, dropped and why.

    Example: oasst-peft data stats demo-smollm2 --json
    """
    from oasst_peft.data import data_stats as compute
    from oasst_peft.data import format_stats

    _, tokenized = _tokenized(recipe_from(recipe, set_), as_json)
    stats = compute(tokenized)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
    else:
        format_stats(stats)


@data_app.command("preview")
def data_preview(
    recipe: RecipeArg,
    set_: SetOpt = None,
    n: Annotated[int, typer.Option("--n", min=1, help="how many examples")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The rendered text of N examples and, token by token, which tokens carry loss.

    Example: oasst-peft data preview demo-smollm2 --n 2
    """
    from oasst_peft.data import data_preview as compute
    from oasst_peft.data import format_preview

    tokenizer, tokenized = _tokenized(recipe_from(recipe, set_), as_json)
    preview = compute(tokenized, tokenizer, n=n)
    if as_json:
        typer.echo(json.dumps(preview, indent=2, ensure_ascii=False))
    else:
        format_preview(preview)


def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs the run would use")] = 1,
    gpu_mem: Annotated[float, typer.Option(callback=above_zero, help="memory per GPU in GiB (> 0)")] = 24.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Parameter counts and per-GPU memory for the recipe's mode and for full/LoRA/QLoRA, ZeRO-2/3.

    Example: oasst-peft plan stablelm7b-qlora --gpu-mem 24
    """
    from oasst_peft.plan import format_plan, plan_recipe

    result = plan_recipe(recipe_from(recipe, set_), gpus=gpus, gpu_mem_gib=gpu_mem)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        format_plan(result)


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context) -> None:
    """List shipped recipes: name, model, mode, data mix and what each is for.

    Example: oasst-peft recipes
    """
    if ctx.invoked_subcommand is None:
        list_recipes()


@recipes_app.command("list")
def list_recipes() -> None:
    """The same table as the bare 'oasst-peft recipes'.

    Example: oasst-peft recipes list
    """
    from rich.console import Console
    from rich.table import Table

    from oasst_peft.config import load_recipe
    from oasst_peft.data.spec import split_entry
    from oasst_peft.shipped import RECIPES_DIR, recipe_description, recipe_names

    table = Table("name", "model", "mode", "data mix", "description")
    for name in recipe_names():
        path = RECIPES_DIR / f"{name}.yaml"
        r = load_recipe(path)
        mix = ", ".join(split_entry(d, i)[0] for i, d in enumerate(r.datasets))
        table.add_row(name, r.model_name, r.mode, mix, recipe_description(path))
    Console(width=max(160, Console().width)).print(table)


@recipes_app.command("copy")
def recipes_copy(
    name: Annotated[str, typer.Argument(help="a shipped recipe's name (see: oasst-peft recipes)")],
    dest: Annotated[
        str | None,  # a str, not a Path: "newdir/" must keep its slash (a folder to create)
        typer.Argument(help="file or folder to write; a name ending in / is a folder (default: here)"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing file")] = False,
) -> None:
    """Write an editable copy of a shipped recipe that works where it is written.

    Example: oasst-peft recipes copy demo-smollm2 my-demo.yaml
    """
    from oasst_peft.shipped import copy_recipe

    path = copy_recipe(name, dest, overwrite=overwrite)
    say(f"wrote {path}; train it with: oasst-peft train {path}")

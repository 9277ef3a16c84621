"""Every command, group and subcommand has ``--help`` with an example, in plain text."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from oasst_peft.cli import app

COMMANDS = [
    [],
    ["train"],
    ["merge"],
    ["export"],
    ["sample"],
    ["chat"],
    ["report"],
    ["plan"],
    ["data"],
    ["data", "stats"],
    ["data", "preview"],
    ["recipes"],
    ["recipes", "list"],
    ["recipes", "copy"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "oasst-peft")
def test_help_shows_an_example_and_no_markup(command):
    res = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Example: oasst-peft " in res.output
    assert "``" not in res.output


def test_the_list_above_names_every_command():
    import typer.main

    group = typer.main.get_command(app)
    listed = {tuple(c) for c in COMMANDS}
    for name, cmd in group.commands.items():
        assert (name,) in listed, name
        for sub in getattr(cmd, "commands", {}):
            assert (name, sub) in listed, (name, sub)

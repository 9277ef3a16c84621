"""The project's one error type for user mistakes, and a helper that suggests the nearest valid key.

Every problem a user can fix (a typo in a recipe, a missing file, a bad data line) is raised as
``OasstError`` with one line saying what is wrong, where, and what to do. The CLI prints that line
and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Iterable


class OasstError(Exception):
    """A user-fixable error: its message is one line naming the file, key or line and the fix."""


class Unavailable(OasstError):
    """A source that cannot be reached from here (a hub model or dataset while offline).

    ``--dry-run`` notes it and goes on; anything else wrong with a recipe stops a dry run too.
    """


def shown(value: object) -> str:
    """``value`` as text for a one-line message: control characters (a newline in a key) escaped."""
    text = str(value)
    return text if text.isprintable() else repr(text)[1:-1]


def closest(word: str, choices: Iterable[str]) -> str | None:
    """Return the valid choice nearest to ``word`` (for 'did you mean ...?'), or None."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close."""
    best = closest(word, choices)
    return f" (did you mean '{best}'?)" if best else ""


GGUF_INSTALL = "pip install 'oasst-peft[demo]' (or pip install gguf)"


def require_module(module: str, needed_for: str, install: str) -> None:
    """One line, before any library is called, when an optional package a step needs is not installed."""
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"{needed_for} needs the {module} package, which is not installed: {install}")

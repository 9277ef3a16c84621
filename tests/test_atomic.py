"""oasst_peft.atomic: whole files or none, with ordinary permissions."""

from __future__ import annotations

import os

import pytest

from oasst_peft import atomic


def test_atomic_writes_keep_the_usual_file_permissions(tmp_path):
    """A written report or Modelfile is readable by others like any file the user makes (umask), not 0600."""
    old = os.umask(0o022)
    try:
        path = atomic.write_json(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = atomic.write_text(tmp_path / "Modelfile", "old\n")
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk went away")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["Modelfile"]

"""oasst-peft: Open-Assistant-style SFT (full, LoRA, QLoRA) from one YAML recipe."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oasst-peft")  # pyproject.toml is the one place the version is written
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

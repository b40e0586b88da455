"""The `rlhf` command (`main`), its `eval` subcommand and the pre-flight checks of `rlhf validate`."""

from rlhf.cli.main import main

__all__ = ["main"]

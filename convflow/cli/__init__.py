"""The `convflow` command: one module per command group under this package; `main` runs one."""

from convflow.cli.app import main, run_command

__all__ = ["main", "run_command"]

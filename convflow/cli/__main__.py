"""`python -m convflow.cli ...`: the same as the `convflow` command."""

from convflow.cli.app import run_command

run_command()

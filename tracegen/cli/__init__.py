"""The command line: thin Typer commands, one module per command group (``app`` is the root)."""

from tracegen.cli.app import app, main

__all__ = ["app", "main"]

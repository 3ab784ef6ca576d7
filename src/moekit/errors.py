"""The one error printer of the commands. A leaf: it imports nothing from moekit, so every
command package can use it without importing the command table (cli.py) back."""

from __future__ import annotations

import sys


def command_error(command: str, error: Exception) -> int:
    """Print `moekit COMMAND: error: ...` to stderr; returns the exit status 2."""
    print(f"moekit {command}: error: {error}", file=sys.stderr)
    return 2

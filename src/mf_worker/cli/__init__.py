"""The ``mf-worker`` command line: the only place that reads the environment.

The commands are grouped by who runs them: `ops` (operators: migrate, config, run, run-once,
schedule, enqueue, status, retry, cancel, memories), `generate` (plugin developers: generators,
generate, with `preview`), `demo` (a first look); `common` holds the typer app they register on,
the shared options, settings and exit codes. ``mf-worker`` (the console script) and
``python -m mf_worker`` both call `main`.
"""

from __future__ import annotations

import sys

# Importing a command module registers its commands on `app`, in this order for --help.
# isort: off
from . import ops
from . import generate
from . import demo
# isort: on
from .common import app, register_command_groups
from .ops import settings_markdown_table

# Command groups of the layers above the command line (the console), by entry point.
register_command_groups()

__all__ = ["app", "demo", "generate", "main", "ops", "settings_markdown_table"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

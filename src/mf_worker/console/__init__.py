"""The operator console: ``mf-worker console``, a web application over the queue's database.

The top floor of the package (docs/architecture.md): it reads through the domain and the
observability readers and acts through the operators' own commands (`status` retry and cancel,
the scheduler's enqueue), and nothing below it imports it. Its third-party dependencies are the
``console`` extra, imported only by `app` and what it serves, so ``mf-worker console --help``
and the settings work without them. See docs/console.md.
"""

from __future__ import annotations

__all__: list[str] = []

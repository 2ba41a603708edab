"""Named SQL: each module keeps its queries in a ``.sql`` file beside it, one block per query.

A block starts with a ``-- name: some_query`` line; the text up to the next header is the query.
Keeping SQL in files named for what they do means a reader finds the claim query in one guess,
and values are always bound parameters (``%(name)s``), never formatted into the text.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Final, LiteralString, cast

_HEADER: Final = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
# Whole-line comments other than headers: for readers of the file, not for the server.
_COMMENT_LINE: Final = re.compile(r"^[ \t]*--(?!\s*name:).*\n", re.MULTILINE)


@cache
def load_queries(package: str, filename: str) -> dict[str, LiteralString]:
    """Parse ``filename`` in ``package`` into ``{name: sql}`` (cached: read once per process)."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    # Dropping the comments keeps long statements under psycopg's cache limit (4 KiB), so
    # their conversion to the wire format is computed once, not at every execution.
    parts = _HEADER.split(_COMMENT_LINE.sub("", text))
    queries: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{package}/{filename}: query {name!r} is defined twice")
        # The text comes from a file shipped in the package, never from input: a literal.
        queries[name] = cast(LiteralString, body.strip())
    return queries

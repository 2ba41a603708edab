"""systemd credentials: secrets that ``LoadCredential=`` placed in ``$CREDENTIALS_DIRECTORY``.

So passwords need not sit in the environment or a unit file: the settings read a secret's
credential through :func:`credential` when its variable is not set.
``$CREDENTIALS_DIRECTORY`` is set by the service manager, not by the operator, which is why it
is read here rather than through the settings object; the function takes an optional
``environ`` mapping for tests and for callers that pass their environment down. Standard
library only: the settings depend on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = ["credential"]

CREDENTIALS_DIRECTORY: Final = "CREDENTIALS_DIRECTORY"


def credential(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The content of ``$CREDENTIALS_DIRECTORY/name`` without its trailing newline, or None
    when there is no credentials directory or no such credential (``LoadCredential=name:…``)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid credential name {name!r}")
    env = os.environ if environ is None else environ
    directory = env.get(CREDENTIALS_DIRECTORY, "").strip()
    if not directory:
        return None
    path = Path(directory) / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return text.removesuffix("\n").removesuffix("\r")

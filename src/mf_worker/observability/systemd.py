"""systemd integration with the standard library only: sd_notify and the watchdog.

* ``notify(state)`` sends one datagram to ``$NOTIFY_SOCKET`` (a filesystem path, or an abstract
  socket written ``@name``): the sd_notify(3) protocol, which is all a ``Type=notify`` unit needs.
* `SystemdNotifier` is what the daemon uses: ``READY=1`` once it is serving, ``STOPPING=1`` when
  shutdown begins, and ``WATCHDOG=1`` keep-alives when the unit sets ``WatchdogSec=`` (systemd
  then exports ``$WATCHDOG_USEC``, and ``$WATCHDOG_PID`` naming the process it expects them from).

Credentials (``LoadCredential=``) are configuration, read by the settings
(``mf_worker.credentials``).

Outside systemd (no ``$NOTIFY_SOCKET``) everything is a no-op.
These variables are set by the service manager, not by the operator, which is why they are read
here rather than through the settings object; functions take an optional ``environ`` mapping
for tests and for callers that pass their environment down.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

__all__ = ["SystemdNotifier", "notify", "watchdog_interval"]

NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _address(raw: str) -> str | None:
    """The socket address for ``$NOTIFY_SOCKET``: a path, or ``@name`` for an abstract socket."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # vsock:… and relative paths are not supported (and never used for services)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the service manager.

    Returns True when the datagram was sent, False when not under systemd or when sending
    failed. Never raises: a daemon must not die because its supervisor went away.
    """
    address = _address(_env(environ).get(NOTIFY_SOCKET, ""))
    if not address or not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1`` (``WatchdogSec=``), or None.

    None when the watchdog is off, ``$WATCHDOG_USEC`` is malformed, or ``$WATCHDOG_PID`` names
    another process (a child that inherited the variables must not feed its parent's watchdog).
    Feed it at half this interval, as sd_watchdog_enabled(3) recommends.
    """
    env = _env(environ)
    pid = env.get("WATCHDOG_PID", "").strip()
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class SystemdNotifier:
    """The daemon's side of a ``Type=notify`` unit; every method is a no-op outside systemd.

    The environment is read once, at construction, so a notifier built at start-up keeps
    working if something later cleans the environment.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = _env(environ)
        self._env = {k: env[k] for k in (NOTIFY_SOCKET,) if k in env}
        self._watchdog = watchdog_interval(env) if self._env else None

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (``$NOTIFY_SOCKET`` is set)."""
        return bool(self._env)

    def notify(self, state: str) -> bool:
        return notify(state, self._env) if self._env else False

    def ready(self, status: str = "") -> bool:
        """Start-up is complete: systemd moves the unit from activating to active."""
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def stopping(self, status: str = "") -> bool:
        """Shutdown has begun (systemd stops expecting watchdog keep-alives)."""
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, status: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        """One keep-alive; systemd restarts the unit if none arrives within ``WatchdogSec=``."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """``WatchdogSec=`` in seconds for this process, or None when there is no watchdog."""
        return self._watchdog


def _one_line(text: str) -> str:
    return " ".join(text.split())

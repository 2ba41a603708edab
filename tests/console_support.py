"""Helpers for the console's tests: users, a real console server on a free port, and rows
that tell a story (a failed item whose episode carries hostile markdown)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import uvicorn

from mf_worker.console.app import create_app
from mf_worker.console.config import ConsoleSettings
from mf_worker.console.users import add_user
from mf_worker.settings import load_settings, parse_plugin_settings

from .factories import make_episode, make_queue_item, make_tenant

PASSWORDS = {"olivia": "olivia-operator-pw", "victor": "victor-viewer-pw"}
# What a model steered by a user's note might write: each line tries to run script.
HOSTILE_MARKDOWN = (
    "## Weekly briefing\n\n"
    "<script>window.__xss = 'script';</script>\n\n"
    '<img src="x" onerror="window.__xss = \'onerror\'">\n\n'
    "[Read the source](javascript:window.__xss='link') and "
    "[the report](https://example.org/report).\n"
)


def write_users(path: Path) -> Path:
    add_user(path, "olivia", "operator", PASSWORDS["olivia"])
    add_user(path, "victor", "viewer", PASSWORDS["victor"])
    return path


@dataclass
class ConsoleServer:
    url: str
    server: uvicorn.Server


@contextmanager
def console_server(db_url: str, users_file: Path | None, **env: str) -> Iterator[ConsoleServer]:
    """A real `mf-worker console` application served by uvicorn in a thread."""
    environ = {"MF_CONSOLE_SECRET_KEY": "k" * 40, **env}
    if users_file is not None:
        environ["MF_CONSOLE_USERS_FILE"] = str(users_file)
    settings, _ = load_settings(environ=environ, overrides={"database_url": db_url})
    app = create_app(settings, parse_plugin_settings(ConsoleSettings, environ))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the console server did not start"
        assert time.monotonic() < deadline, "the console server did not start in 30 s"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield ConsoleServer(f"http://127.0.0.1:{port}", server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def seed_story(db: psycopg.Connection[Any]) -> dict[str, Any]:
    """A failed item with an episode (its blocks hostile markdown) and usage booked, a pending
    item of another organisation, and a completed one."""
    now = datetime.now(UTC)
    failing = make_tenant(db)
    episode = make_episode(db, failing["project"], title="Vertical farms: week 12",
                           status="failed", generation_attempts=2,
                           generation_errors=["provider timeout after 120 s",
                                              "invalid output: empty text"])
    db.execute("INSERT INTO blocks (episode_id, organization_id, content, position) "
               "VALUES (%s, %s, %s, 0)",
               [episode["id"], failing["org"]["id"], HOSTILE_MARKDOWN])
    db.execute("INSERT INTO token_usage (organization_id, project_id, episode_id, operation, "
               "model, prompt_tokens, completion_tokens, cost_gbp, billing_date, estimated) "
               "VALUES (%s, %s, %s, 'episode_generation', 'gpt-test', 1200, 800, 0.0125, "
               "%s, false)", [failing["org"]["id"], failing["project"]["id"], episode["id"],
                              now.date()])
    failed = make_queue_item(db, failing["project"], status="failed", attempt_count=2,
                             scheduled_for=now - timedelta(hours=2),
                             run_after=now - timedelta(hours=2),
                             last_error="invalid output: empty text", episode_id=episode["id"],
                             locked_by=None)
    other = make_tenant(db, title="Ocean carbon removal")
    pending = make_queue_item(db, other["project"], scheduled_for=now + timedelta(hours=3),
                              run_after=now + timedelta(hours=3))
    third = make_tenant(db, title="Grid-scale batteries")
    completed = make_queue_item(db, third["project"], status="completed",
                                scheduled_for=now - timedelta(minutes=30),
                                run_after=now - timedelta(minutes=30), completed_at=now)
    return {"failing": failing, "episode": episode, "failed": failed, "other": other,
            "pending": pending, "completed": completed}

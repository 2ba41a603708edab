"""The operator console over HTTP, against a real database and a real server (no browser):
sign-in and its rate limit, sessions, CSRF, roles, the security headers, the pages' content,
the actions and their audit rows, sanitised episode text, and `mf-worker console add-user`.
The same flows in a real browser are tests/test_console_browser.py."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from mf_worker.console.render import render_markdown
from mf_worker.console.security import LoginLimiter, SessionCodec
from mf_worker.console.users import UsersFile, add_user

from .console_support import PASSWORDS, ConsoleServer, console_server, seed_story, write_users

Conn = psycopg.Connection[Any]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return write_users(tmp_path / "console-users")


@pytest.fixture
def server(db_url: str, users: Path) -> Iterator[ConsoleServer]:
    with console_server(db_url, users) as running:
        yield running


def client(server: ConsoleServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, follow_redirects=False, timeout=30)


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def sign_in(http: httpx.Client, name: str, password: str | None = None) -> httpx.Response:
    page = http.get("/login")
    return http.post("/login", data={"username": name, "password": password or PASSWORDS[name],
                                      "csrf": csrf_of(page.text), "next": "/items"})


def test_every_page_asks_for_sign_in_and_comes_back_after_it(server: ConsoleServer) -> None:
    with client(server) as http:
        for path in ("/", "/items?status=failed", "/organizations", "/providers"):
            answer = http.get(path)
            assert answer.status_code == 303
            assert answer.headers["location"].startswith("/login?next=")
        signed = sign_in(http, "olivia")
        assert signed.status_code == 303 and signed.headers["location"] == "/items"
        assert http.get("/").status_code == 200


def test_the_session_cookie_is_signed_httponly_and_samesite(server: ConsoleServer) -> None:
    with client(server) as http:
        answer = sign_in(http, "olivia")
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert "secure" not in cookie  # plain HTTP here; behind TLS see the proxy test
        forged = http.cookies["mf_console"][:-2] + "xx"
        http.cookies.clear()
        http.cookies.set("mf_console", forged)
        assert http.get("/").status_code == 303


def test_wrong_passwords_are_refused_and_then_rate_limited(server: ConsoleServer) -> None:
    with client(server) as http:
        answers = [sign_in(http, "olivia", "wrong-password-here").status_code for _ in range(6)]
        assert answers == [401] * 5 + [429]
        # Even the right password waits now: the limit is on the name and the address.
        assert sign_in(http, "olivia").status_code == 429


def test_sign_in_without_the_forms_token_is_refused(server: ConsoleServer) -> None:
    with client(server) as http:
        http.get("/login")
        answer = http.post("/login", data={"username": "olivia",
                                           "password": PASSWORDS["olivia"], "csrf": "forged"})
        assert answer.status_code == 403


def test_responses_carry_a_strict_content_security_policy(server: ConsoleServer) -> None:
    with client(server) as http:
        sign_in(http, "victor")
        headers = http.get("/").headers
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff"


def test_the_pages_show_the_queue(server: ConsoleServer, db: Conn) -> None:
    story = seed_story(db)
    with client(server) as http:
        sign_in(http, "victor")
        overview = http.get("/").text
        assert "<svg" in overview and "Last hour: 1 completed" in overview
        failed = http.get("/items", params={"status": "failed"}).text
        assert story["failed"]["id"] in failed and story["pending"]["id"] not in failed
        by_error = http.get("/items", params={"error": "EMPTY TEXT"}).text
        assert story["failed"]["id"] in by_error and story["completed"]["id"] not in by_error
        item = http.get(f"/items/{story['failed']['id']}").text
        for fact in ("provider timeout after 120 s", "gpt-test: 1200 + 800 tokens",
                     "Vertical farms: week 12", "£0.01"):
            assert fact in item
        project = http.get(f"/projects/{story['other']['project']['id']}").text
        assert story["pending"]["id"] in project
        assert http.get("/organizations").status_code == 200
        assert http.get("/providers").status_code == 200


def test_a_project_page_shows_any_cadence(server: ConsoleServer, db: Conn) -> None:
    """A cadence without `days` (daily, weekdays) or a malformed one still renders."""
    from .factories import make_tenant

    weekdays = make_tenant(db, cadence={"mode": "weekdays"})["project"]
    broken = make_tenant(db, cadence={"every": "fortnight"})["project"]
    with client(server) as http:
        sign_in(http, "victor")
        assert "weekdays" in http.get(f"/projects/{weekdays['id']}").text
        assert http.get(f"/projects/{broken['id']}").status_code == 200


def test_items_page_by_keyset_without_gaps_or_repeats(server: ConsoleServer, db: Conn) -> None:
    from .factories import make_queue_item, make_tenant

    tenant = make_tenant(db)
    made = {make_queue_item(db, tenant["project"], status="cancelled")["id"]
            for _ in range(120)}
    seen: list[str] = []
    with client(server) as http:
        sign_in(http, "victor")
        link: str | None = "/items?status=cancelled"
        while link:
            html = http.get(link).text
            seen += re.findall(r'<a href="/items/(queue_[^"]+)">', html)
            found = re.search(r'<a href="([^"]+)" rel="next">', html)
            link = found.group(1).replace("&amp;", "&") if found else None
    assert len(seen) == len(set(seen)) == 120 and set(seen) == made


def test_an_operator_retries_with_the_token_and_is_audited(server: ConsoleServer,
                                                          db: Conn) -> None:
    story = seed_story(db)
    item_id = story["failed"]["id"]
    with client(server) as http:
        sign_in(http, "olivia")
        confirm = http.get(f"/items/{item_id}/retry")
        assert confirm.status_code == 200 and "Yes, retry" in confirm.text
        missing = http.post(f"/items/{item_id}/retry", data={})
        assert missing.status_code == 403
        assert db.execute("SELECT status FROM episode_schedule_queue WHERE id = %s",
                          [item_id]).fetchone() == {"status": "failed"}
        done = http.post(f"/items/{item_id}/retry", data={"csrf": csrf_of(confirm.text)})
        assert done.status_code == 303
        assert "Retried" in http.get(done.headers["location"]).text
    row = db.execute("SELECT status, attempt_count FROM episode_schedule_queue WHERE id = %s",
                     [item_id]).fetchone()
    assert row == {"status": "pending", "attempt_count": 0}
    audit = db.execute("SELECT action, actor, old_value, new_value FROM audit_log "
                       "WHERE resource_id = %s", [item_id]).fetchall()
    assert audit == [{"action": "queue_item.retry", "actor": "olivia (console)",
                      "old_value": "failed", "new_value": "pending"}]


def test_cancel_needs_a_reason_and_enqueue_refuses_a_second_open_item(
    server: ConsoleServer, db: Conn,
) -> None:
    story = seed_story(db)
    item_id = story["pending"]["id"]
    with client(server) as http:
        sign_in(http, "olivia")
        token = csrf_of(http.get(f"/items/{item_id}/cancel").text)
        assert http.post(f"/items/{item_id}/cancel", data={"csrf": token}).status_code == 409
        done = http.post(f"/items/{item_id}/cancel",
                         data={"csrf": token, "reason": "user asked to skip this week"})
        assert done.status_code == 303
        row = db.execute("SELECT status, last_error FROM episode_schedule_queue WHERE id = %s",
                         [item_id]).fetchone()
        assert row == {"status": "cancelled", "last_error": "user asked to skip this week"}
        project_id = story["other"]["project"]["id"]
        first = http.post(f"/projects/{project_id}/enqueue", data={"csrf": token})
        assert first.status_code == 303
        second = http.post(f"/projects/{project_id}/enqueue", data={"csrf": token})
        assert second.status_code == 409 and "already has an open item" in second.text
    actions = [r["action"] for r in db.execute(
        "SELECT action FROM audit_log WHERE actor = 'olivia (console)' ORDER BY created_at")]
    assert actions == ["queue_item.cancel", "queue_item.enqueue"]


def hold_key(db: Conn, key: str = "openai:gpt-test") -> str:
    db.execute("INSERT INTO provider_limits (limit_key, refilled_at, cooldown_until, "
               "cooldown_reason, requests_per_second, request_level) VALUES "
               "(%s, now(), now() + interval '1 hour', 'quota_exhausted', 2, 0)", [key])
    return key


def test_an_operator_resets_a_provider_key_audited_fleet_wide(server: ConsoleServer,
                                                              db: Conn) -> None:
    key = hold_key(db)
    with client(server) as http:
        sign_in(http, "olivia")
        assert "quota_exhausted until" in http.get("/providers").text
        confirm = http.get("/providers/reset", params={"key": key})
        assert "Yes, reset" in confirm.text
        done = http.post("/providers/reset", data={"csrf": csrf_of(confirm.text), "key": key})
        assert done.status_code == 303
        page = http.get(done.headers["location"]).text
        assert "Reset: the key admits calls again" in page and "quota_exhausted" not in page
        missing = http.post("/providers/reset",
                            data={"csrf": csrf_of(confirm.text), "key": "no-such-key"})
        assert missing.status_code == 409
    row = db.execute("SELECT cooldown_until, request_level, requests_per_second "
                     "FROM provider_limits WHERE limit_key = %s", [key]).fetchone()
    assert row == {"cooldown_until": None, "request_level": None, "requests_per_second": None}
    audit = db.execute("SELECT organization_id, action, actor, resource_id, old_value "
                       "FROM audit_log").fetchall()
    assert audit == [{"organization_id": None, "action": "provider_limit.reset",
                      "actor": "olivia (console)", "resource_id": key,
                      "old_value": "quota_exhausted"}]


def test_a_viewer_sees_everything_and_changes_nothing(server: ConsoleServer, db: Conn) -> None:
    story = seed_story(db)
    item_id = story["failed"]["id"]
    with client(server) as http:
        sign_in(http, "victor")
        page = http.get(f"/items/{item_id}").text
        assert "Retry…" not in page
        answer = http.post(f"/items/{item_id}/retry", data={"csrf": csrf_of(page)})
        assert answer.status_code == 403 and "can see everything but change nothing" in answer.text
    assert db.execute("SELECT status FROM episode_schedule_queue WHERE id = %s",
                      [item_id]).fetchone() == {"status": "failed"}
    assert db.execute("SELECT count(*) AS n FROM audit_log").fetchone() == {"n": 0}


def test_removing_a_user_from_the_file_ends_their_session(server: ConsoleServer,
                                                          users: Path) -> None:
    with client(server) as http:
        sign_in(http, "victor")
        assert http.get("/").status_code == 200
        kept = [line for line in users.read_text().splitlines()
                if not line.startswith("victor:")]
        users.write_text("\n".join(kept) + "\n")
        assert http.get("/").status_code == 303


def test_a_trusted_proxys_user_header_is_believed_and_nobody_elses(
    db_url: str, users: Path,
) -> None:
    env = {"MF_CONSOLE_USER_HEADER": "X-Forwarded-User"}
    with console_server(db_url, users, MF_CONSOLE_TRUSTED_PROXIES="127.0.0.1", **env) as srv, \
            client(srv) as http:
        answer = http.get("/", headers={"X-Forwarded-User": "olivia",
                                        "X-Forwarded-Proto": "https"})
        assert answer.status_code == 200 and "olivia" in answer.text
        assert "secure" in answer.headers["set-cookie"].lower()
    with console_server(db_url, users, MF_CONSOLE_TRUSTED_PROXIES="10.0.0.0/8", **env) as srv, \
            client(srv) as http:
        assert http.get("/", headers={"X-Forwarded-User": "olivia"}).status_code == 303


def test_markdown_is_rendered_without_script_handlers_or_javascript_links() -> None:
    from .console_support import HOSTILE_MARKDOWN

    html = str(render_markdown(HOSTILE_MARKDOWN))
    assert "<script" not in html and "<img" not in html and 'href="javascript' not in html
    assert "&lt;script&gt;" in html  # shown as text, not dropped silently
    assert '<a href="https://example.org/report"' in html and "<h2>" in html


def test_the_login_limiter_forgets_failures_after_its_window() -> None:
    limiter = LoginLimiter(attempts=2, window=60)
    limiter.failed("ip:a", now=0)
    limiter.failed("ip:a", now=1)
    assert limiter.retry_after("ip:a", now=2) == pytest.approx(58)
    assert limiter.retry_after("ip:b", now=2) == 0
    assert limiter.retry_after("ip:a", now=61) == 0


def test_expired_or_foreign_sessions_are_void() -> None:
    from mf_worker.console.security import Session

    cookie = SessionCodec("a" * 40, max_age=3600).dumps(Session(user="olivia"))
    assert SessionCodec("a" * 40, max_age=3600).loads(cookie) is not None
    assert SessionCodec("b" * 40, max_age=3600).loads(cookie) is None
    assert SessionCodec("a" * 40, max_age=-1).loads(cookie) is None


def test_add_user_writes_a_private_file_of_argon2_hashes(tmp_path: Path) -> None:
    path = tmp_path / "users"
    result = subprocess.run(
        [sys.executable, "-m", "mf_worker", "console", "add-user", "ana@example.org",
         "--role", "operator", "--users-file", str(path), "--password-stdin"],
        input="a long enough password\n", capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    line = path.read_text().splitlines()[-1]
    assert line.startswith("ana@example.org:operator:$argon2id$")
    assert "a long enough password" not in path.read_text()
    users = UsersFile(path)
    assert users.verify("ana@example.org", "a long enough password") is not None
    assert users.verify("ana@example.org", "wrong") is None
    assert add_user(path, "ana@example.org", "viewer", "another long password") is False
    assert UsersFile(path).role_of("ana@example.org") == "viewer"
    with pytest.raises(ValueError, match="12 characters"):
        add_user(path, "bob", "viewer", "short")


@pytest.fixture
def console_role_url(db_url: str, db: Conn) -> Iterator[str]:
    """``db_url`` logged in as the console's documented role: docs/database-roles.sql applied
    with psql and a console password, as an operator does."""
    import uuid

    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from .conftest import ROLES_SQL, ensure_cross_org_role, require_binary

    worker, console = (f"mf_test_{kind}_{uuid.uuid4().hex[:10]}" for kind in ("w", "console"))
    ensure_cross_org_role(db)
    applied = subprocess.run(
        [require_binary("psql"), db_url, "-v", f"worker_role={worker}", "-v",
         "worker_password='x'", "-v", f"console_role={console}", "-v",
         "console_password='y'", "-f", str(ROLES_SQL)],
        capture_output=True, text=True, timeout=60, check=False)
    assert applied.returncode == 0, applied.stderr
    try:
        yield make_conninfo("", **{**conninfo_to_dict(db_url), "user": console})
    finally:
        for role in (worker, console):
            db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE usename = %s", [role])
            db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_console_works_under_its_least_privilege_role(
    console_role_url: str, db: Conn, users: Path,
) -> None:
    """Every page and action through the documented role (row-level security applies), which
    still cannot read a user's address."""
    story = seed_story(db)
    with console_server(console_role_url, users) as srv, client(srv) as http:
        sign_in(http, "olivia")
        for path in ("/", "/items", "/organizations", "/providers",
                     f"/projects/{story['other']['project']['id']}"):
            assert http.get(path).status_code == 200, path
        item = http.get(f"/items/{story['failed']['id']}")
        assert item.status_code == 200 and "provider timeout after 120 s" in item.text
        assert "Weekly briefing" in item.text and "gpt-test" in item.text
        token = csrf_of(item.text)
        assert http.post(f"/items/{story['failed']['id']}/retry",
                         data={"csrf": token}).status_code == 303
        assert http.post(f"/items/{story['pending']['id']}/cancel",
                         data={"csrf": token, "reason": "support ticket 42"}).status_code == 303
        assert http.post(f"/projects/{story['other']['project']['id']}/enqueue",
                         data={"csrf": token}).status_code == 303
        assert http.post("/providers/reset",
                         data={"csrf": token, "key": hold_key(db)}).status_code == 303
    assert db.execute("SELECT count(*) AS n FROM audit_log").fetchone() == {"n": 4}
    with psycopg.connect(console_role_url) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT email FROM users")


def test_the_console_is_deployable_the_three_ways() -> None:
    """A compose service (opt-in profile, its own database role, loopback port), a Kubernetes
    Deployment probing /healthz as non-root on a read-only root, and a systemd unit reading
    its secrets as credentials (tests/test_deploy.py verifies and scores the unit)."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "deploy" / "compose.yaml").read_text())
    console = compose["services"]["console"]
    assert console["command"] == ["console"] and console["profiles"] == ["console"]
    assert console["build"]["args"]["EXTRAS"] == "console"
    assert console["environment"]["MF_DATABASE_URL"].startswith("postgresql://mf_console:")
    assert console["ports"] == ["127.0.0.1:8080:8080"] and console["read_only"] is True
    assert any("console_password" in arg for arg in compose["services"]["roles"]["command"])
    docs = list(yaml.safe_load_all((root / "deploy" / "kubernetes" / "console.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["console"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    unit = (root / "systemd" / "mf-worker-console.service").read_text()
    assert "ExecStart=/opt/mf-worker/bin/mf-worker console\n" in unit
    assert "LoadCredential=mf_console_users:" in unit


def test_healthz_answers_without_sign_in(server: ConsoleServer) -> None:
    with client(server) as http:
        answer = http.get("/healthz")
    assert (answer.status_code, answer.text) == (200, "ok\n")


def test_fleet_audit_rows_are_hidden_from_an_organisations_own_view(db_url: str,
                                                                    db: Conn) -> None:
    """A key reset's audit row has no organisation (migration 0015): a role that is not a
    member of mf_cross_org neither sees such rows, acting for any organisation, nor writes
    one."""
    import uuid

    from psycopg import sql

    from .factories import make_tenant

    tenant = make_tenant(db)
    db.execute("INSERT INTO audit_log (organization_id, action, actor) "
               "VALUES (NULL, 'provider_limit.reset', 'olivia (console)')")
    role = f"mf_test_app_{uuid.uuid4().hex[:10]}"
    db.execute(sql.SQL("CREATE ROLE {} NOSUPERUSER NOBYPASSRLS").format(sql.Identifier(role)))
    db.execute(sql.SQL("GRANT SELECT, INSERT ON audit_log TO {}").format(sql.Identifier(role)))
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            with conn.transaction():
                conn.execute("SELECT set_config('app.current_org_id', %s, true)",
                             [tenant["org"]["id"]])
                assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (0,)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("INSERT INTO audit_log (organization_id, action, actor) "
                                 "VALUES (NULL, 'x', 'y')")
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_database_failure_is_a_page_not_a_crash(server: ConsoleServer, db: Conn) -> None:
    """A statement that fails (here: the queue table gone) answers 503 with the reason, with
    the security headers, and the console keeps serving."""
    with client(server) as http:
        sign_in(http, "victor")
        db.execute("ALTER TABLE episode_schedule_queue RENAME TO q_away")
        try:
            answer = http.get("/items")
        finally:
            db.execute("ALTER TABLE q_away RENAME TO episode_schedule_queue")
        assert answer.status_code == 503 and "The database did not answer" in answer.text
        assert "default-src 'none'" in answer.headers["content-security-policy"]
        assert http.get("/items").status_code == 200

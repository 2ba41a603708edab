"""The console's ASGI application: the routes, the sign-in, and what every page shares.

`create_app` builds a Starlette application around a `Console` (the pool, the users, the
session codec, the templates). Pages are plain functions ``(request, ctx) -> Response`` in one
module per page (`overview`, `items`, `organizations`, `providers`, `actions`), wrapped by
`page` (signed in) or `action` (a POST by an operator, with the form's CSRF token). Every
response carries the security headers of `security`.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import jinja2
import psycopg
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..db import Pool, open_pool
from ..errors import describe_error
from ..logs import get_logger
from ..settings import Settings
from .config import ConsoleSettings
from .security import (
    COOKIE,
    SECURITY_HEADERS,
    LoginLimiter,
    Session,
    SessionCodec,
    csrf_matches,
    from_trusted_proxy,
)
from .users import User, UsersFile

__all__ = ["Console", "Context", "action", "create_app", "page"]

HERE: Final = Path(__file__).resolve().parent
log = get_logger("mf_worker.console")


def _when(value: datetime | date | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return value.isoformat()


def _gbp(value: Decimal | float | int | None) -> str:
    return "—" if value is None else f"£{Decimal(value):,.2f}"


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["gbp"] = _gbp
    env.filters["q"] = lambda v: quote(str(v), safe="")
    return env


@dataclass
class Console:
    """What the pages share: settings, the pool (opened by the app's lifespan), users, keys."""

    settings: Settings
    config: ConsoleSettings
    users: UsersFile | None
    codec: SessionCodec
    pool: Pool | None = None
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    templates: jinja2.Environment = field(default_factory=_templates)

    def connection(self) -> Any:
        assert self.pool is not None, "the console's pool opens with the application"
        return self.pool.connection()


@dataclass
class Context:
    """One request's console, user and session."""

    console: Console
    user: User
    session: Session
    request: Request

    def render(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        return render(self.console, self.request, template, status=status, user=self.user,
                      session=self.session, **values)

    @property
    def actor(self) -> str:
        """Who the audit rows name: the signed-in user, and that it was the console."""
        return f"{self.user.name} (console)"


def render(console: Console, request: Request, template: str, *, status: int = 200,
           user: User | None, session: Session, **values: Any) -> HTMLResponse:
    html = console.templates.get_template(template).render(
        title=console.config.title, user=user, csrf=session.csrf, path=request.url.path,
        **values)
    return HTMLResponse(html, status_code=status)


def _session_of(console: Console, request: Request) -> Session | None:
    return console.codec.loads(request.cookies.get(COOKIE))


def _set_session(console: Console, request: Request, response: Response,
                 session: Session) -> None:
    response.set_cookie(
        COOKIE, console.codec.dumps(session), max_age=int(console.codec.max_age), path="/",
        httponly=True, samesite="strict", secure=request.url.scheme == "https")


def _user_of(console: Console, request: Request, session: Session | None) -> User | None:
    header = console.config.user_header
    if header and request.scope.get("mf_trusted_proxy"):
        name = request.headers.get(header, "").strip()
        if name:
            role = console.users.role_of(name) if console.users else None
            return User(name, role or "viewer")
    if session is None or session.user is None or console.users is None:
        return None
    role = console.users.role_of(session.user)
    return User(session.user, role) if role else None


Handler = Callable[[Request, Context], Awaitable[Response]]


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A page for any signed-in user; others go to the sign-in page and come back."""

    async def endpoint(request: Request) -> Response:
        console: Console = request.app.state.console
        session = _session_of(console, request)
        user = _user_of(console, request, session)
        if user is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        fresh = session is None
        ctx = Context(console, user, session or Session(user=None), request)
        response = await _answer(ctx, handler(request, ctx))
        if fresh:  # signed in by the proxy: a session for the CSRF token of its forms
            _set_session(console, request, response, ctx.session)
        return response

    return endpoint


def action(handler: Callable[[Request, Context, FormData], Awaitable[Response]],
           ) -> Callable[[Request], Awaitable[Response]]:
    """A POST that changes something: an operator's, with the form's CSRF token."""

    async def endpoint(request: Request) -> Response:
        console: Console = request.app.state.console
        session = _session_of(console, request)
        user = _user_of(console, request, session)
        form = await request.form()
        if user is None or session is None:
            return _refused(console, request, user, session, 403,
                            "You are not signed in (or your session has ended). Sign in again.")
        ctx = Context(console, user, session, request)
        if not csrf_matches(session, form.get("csrf")):
            log.warning("console_csrf_refused", user=user.name, path=request.url.path)
            return ctx.render("error.html", status=403, heading="Refused",
                              message="The form's security token did not match this session. "
                                      "Reload the page and try again.")
        if not user.can_act:
            log.warning("console_action_refused", user=user.name, role=user.role,
                        path=request.url.path)
            return ctx.render("error.html", status=403, heading="Refused",
                              message=f"Your role ({user.role}) can see everything but "
                                      "change nothing.")
        return await _answer(ctx, handler(request, ctx, form))

    return endpoint


async def _answer(ctx: Context, response: Awaitable[Response]) -> Response:
    """The handler's response; a page of its own (with the usual headers) when the database
    fails it, instead of a bare 500."""
    try:
        return await response
    except (psycopg.Error, PoolTimeout) as exc:
        log.warning("console_database_error", path=ctx.request.url.path,
                    error=describe_error(exc))
        return ctx.render("error.html", status=503, heading="Database error",
                          message=f"The database did not answer: {describe_error(exc)}")


def _refused(console: Console, request: Request, user: User | None, session: Session | None,
             status: int, message: str) -> HTMLResponse:
    return render(console, request, "error.html", status=status, user=user,
                  session=session or Session(), heading="Refused", message=message)


def _safe_next(target: str | None) -> str:
    """Only a path on this site (never ``//host`` or a scheme): no open redirect."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def login_page(request: Request) -> Response:
    console: Console = request.app.state.console
    session = _session_of(console, request) or Session()
    response = render(console, request, "login.html", user=None, session=session,
                      next=_safe_next(request.query_params.get("next")), error=None)
    _set_session(console, request, response, session)
    return response


async def login(request: Request) -> Response:
    console: Console = request.app.state.console
    session = _session_of(console, request)
    form = await request.form()
    target = _safe_next(str(form.get("next") or ""))
    name = str(form.get("username") or "").strip()[:100]
    password = str(form.get("password") or "")

    def again(message: str, status: int) -> Response:
        fresh = session or Session()
        response = render(console, request, "login.html", status=status, user=None,
                          session=fresh, next=target, error=message)
        _set_session(console, request, response, fresh)
        return response

    if session is None or not csrf_matches(session, form.get("csrf")):
        return again("The form had expired. Please sign in again.", 403)
    keys = (f"ip:{_client(request)}", f"user:{name.lower()}")
    wait = console.limiter.retry_after(*keys)
    if wait > 0:
        log.warning("console_login_throttled", user=name, client=_client(request))
        response = again(f"Too many failed sign-ins. Try again in {int(wait) + 1} s.", 429)
        response.headers["retry-after"] = str(int(wait) + 1)
        return response
    user = console.users.verify(name, password) if console.users and name else None
    if user is None:
        console.limiter.failed(*keys)
        log.warning("console_login_failed", user=name, client=_client(request))
        return again("Wrong user name or password.", 401)
    console.limiter.succeeded(*keys)
    log.info("console_login", user=user.name, role=user.role, client=_client(request))
    response = RedirectResponse(target, status_code=303)
    # A new session (and CSRF token) at sign-in: a token seen before it is worth nothing.
    _set_session(console, request, response, Session(user=user.name))
    return response


async def logout(request: Request) -> Response:
    console: Console = request.app.state.console
    session = _session_of(console, request)
    form = await request.form()
    if session is None or not csrf_matches(session, form.get("csrf")):
        return _refused(console, request, None, session, 403,
                        "The form's security token did not match this session.")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


async def healthz(request: Request) -> Response:
    """For probes, without sign-in: 200 when the database answers, else 503."""
    console: Console = request.app.state.console
    try:
        async with console.connection() as conn:
            await conn.execute("SELECT 1")
    except Exception as exc:  # any failure to reach the database: not ready
        log.warning("console_unhealthy", error=str(exc))
        return PlainTextResponse("database unreachable\n", status_code=503)
    return PlainTextResponse("ok\n")


class SecurityHeaders:
    """Adds the security headers to every response, and believes ``X-Forwarded-Proto`` and
    ``X-Forwarded-For`` only from a trusted proxy (marking the request as coming through one,
    for the user header)."""

    def __init__(self, app: ASGIApp, trusted: tuple[Any, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        if from_trusted_proxy(client[0] if client else None, self.trusted):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            scope = dict(scope, mf_trusted_proxy=True)
            proto = headers.get("x-forwarded-proto", "").split(",")[-1].strip()
            if proto in ("http", "https"):
                scope["scheme"] = proto
            forwarded = headers.get("x-forwarded-for", "").split(",")[-1].strip()
            if forwarded:
                scope["client"] = (forwarded, 0)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                         if k.encode() not in present]
                message = dict(message, headers=[*message.get("headers", []), *extra])
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings, config: ConsoleSettings, *, open_db: bool = True) -> Starlette:
    """The console application; its lifespan opens (and closes) the database pool."""
    from . import actions, items, organizations, overview, providers

    if config.users_file is None and not config.user_header:
        raise ValueError("set MF_CONSOLE_USERS_FILE (users: mf-worker console add-user), or "
                         "MF_CONSOLE_USER_HEADER with MF_CONSOLE_TRUSTED_PROXIES")
    key = config.secret_key.reveal() if config.secret_key else secrets.token_urlsafe(48)
    if config.secret_key is None:
        log.warning("console_random_secret_key",
                    detail="MF_CONSOLE_SECRET_KEY is unset: sessions end when this process does")
    users = UsersFile(config.users_file) if config.users_file else None
    console = Console(settings=settings, config=config, users=users,
                      codec=SessionCodec(key, config.session_hours * 3600))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if open_db:
            console.pool = await open_pool(settings, max_size=min(settings.pool_size, 8))
        try:
            yield
        finally:
            if console.pool is not None:
                await console.pool.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", page(overview.show), methods=["GET"]),
        Route("/items", page(items.list_items), methods=["GET"]),
        Route("/items/{item_id}", page(items.show_item), methods=["GET"]),
        Route("/projects/{project_id}", page(items.show_project), methods=["GET"]),
        Route("/organizations", page(organizations.show), methods=["GET"]),
        Route("/providers", page(providers.show), methods=["GET"]),
        *actions.routes(),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = console
    app.add_middleware(SecurityHeaders, trusted=config.trusted_proxies)
    return app


def query_args(values: Mapping[str, str | None]) -> str:
    """A query string of the non-empty values (for pagination links)."""
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in values.items() if v)

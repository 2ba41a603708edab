"""The one settings object: every knob mf-worker has, read once at the CLI entry point.

Each field carries its environment variable, its parser and its documentation in one place, so
the README table, the validation and the "unknown variable" warning cannot drift apart. Nothing
else in the package reads ``os.environ``: the settings object is built here and passed down.
(The exceptions are `mf_worker.observability.systemd` and `mf_worker.credentials`, which read the
variables the service manager sets.)

A secret may also come from a systemd credential (``LoadCredential=``): when neither its variable
nor its fallback variable is set, the file ``$CREDENTIALS_DIRECTORY/<credential>`` is read.

Plugins' settings go through the same parser. A plugin declares its own frozen dataclass of
fields made with `setting` (the `openai` generator's is `OpenAISettings`) and registers it under
the ``mf_worker.settings`` entry-point group; `load_settings` then parses and validates it at
start-up with the core settings (a bad value stops the process, naming the variable), `config`
shows it and the README documents it. The plugin reads its values with `Settings.plugin(spec)`;
see docs/plugins.md.

A plugin can be configured twice: as the generator and as the fallback generator
(``MF_FALLBACK_GENERATOR``). A spec that declares its variables' common prefix
(``ENV_PREFIX = "MF_LLM_"``, a class attribute) gets a second set of the same variables with
``FALLBACK_`` after that prefix (``MF_LLM_FALLBACK_MODEL``; its credential likewise), parsed,
validated, shown and documented like the first; the fallback instance is handed
`Settings.as_fallback()`, whose `Settings.plugin` reads that set.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar

import psycopg.conninfo

from .credentials import credential as read_credential
from .errors import ConfigError, PluginLoadError
from .logs import mask, mask_url_password, url_passwords
from .plugins import entry_point_targets, import_target
from .smtp import parse_address, parse_address_list, parse_smtp_url

ENV_PREFIX: Final = "MF_"
T = TypeVar("T")

PLUGIN_SETTINGS_GROUP: Final = "mf_worker.settings"
"""The entry-point group a plugin registers its settings spec (a `setting` dataclass) under."""

FALLBACK_ROLE: Final = "fallback"
"""The role of the fallback generator's instance (`Settings.as_fallback`)."""
_FALLBACK_INFIX: Final = "FALLBACK_"

# Variables that are not settings but are legitimately MF_-prefixed (used by the test harness).
_KNOWN_NON_SETTINGS: Final = frozenset({"MF_TEST_DATABASE_URL", "MF_TEST_REQUIRE_ALL"})


class Secret:
    """A string that never shows itself in a repr, a log line or an error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# ---------------------------------------------------------------------------------------------
# Parsers: each takes the raw text and returns the value or raises ValueError with the reason.
# ---------------------------------------------------------------------------------------------

Parser = Callable[[str], Any]


def _int(minimum: int, maximum: int | None = None) -> Parser:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}")
        return value

    return parse


def _float(minimum: float, *, exclusive: bool = False, maximum: float | None = None) -> Parser:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("must be a number") from None
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if value < minimum or (exclusive and value == minimum):
            raise ValueError(f"must be {'greater than' if exclusive else 'at least'} {minimum:g}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum:g}")
        return value

    return parse


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _gbp(raw: str) -> Decimal:
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise ValueError("must be an amount in pounds, e.g. 50 or 0.50") from None
    if not value.is_finite() or value < 0:
        raise ValueError("must be a non-negative amount in pounds")
    return value


def _secret_text(raw: str) -> Secret:
    return Secret(_text(raw))


def _url(raw: str) -> Secret:
    text = raw.strip()
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return Secret(text)


BUILT_IN_NOTIFIERS: Final = ("log", "webhook", "email")


def _notifiers(raw: str) -> str:
    """A comma-separated list of notifiers, normalised to ``a,b`` (each at most once)."""
    names: list[str] = []
    for entry in raw.split(","):
        name = entry.strip()
        if not name:
            raise ValueError("an empty entry; give e.g. log,webhook,email")
        if name.lower() in BUILT_IN_NOTIFIERS:
            name = name.lower()
        elif ":" not in name:
            raise ValueError(f"{name!r} is not one of {', '.join(BUILT_IN_NOTIFIERS)} "
                             "or package.module:attr")
        if name in names:
            raise ValueError(f"{name!r} is listed twice")
        names.append(name)
    return ",".join(names)


def _smtp_url(raw: str) -> Secret:
    parse_smtp_url(raw)
    return Secret(raw.strip())


def _optional_addr(raw: str) -> str:
    text = raw.strip()
    if text:
        _host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be host:port (e.g. 0.0.0.0:9464), or empty to disable")
    return text


def _bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be one of on/off, true/false, yes/no, 1/0")


def _choice(*choices: str) -> Parser:
    def parse(raw: str) -> str:
        text = raw.strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def _text(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _file(raw: str) -> Path:
    path = Path(raw.strip()).expanduser()
    if not path.is_file():
        raise ValueError("no such file")
    return path


def redact_conninfo(conninfo: str) -> str:
    """The connection string with any password replaced by ``***``, safe to show."""
    return mask_url_password(conninfo)


def _database_url(raw: str) -> Secret:
    text = raw.strip()
    if not text:
        raise ValueError("must not be empty")
    is_url = text.startswith(("postgresql://", "postgres://"))
    if "://" in text and not is_url:
        raise ValueError("must be a postgresql:// URL or a libpq key=value string")
    if not is_url and "=" not in text:
        raise ValueError("must be a postgresql:// URL or a libpq key=value string")
    try:
        psycopg.conninfo.conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        reason = redact_conninfo(str(exc).strip().splitlines()[0])
        for secret_part in _password_parts(text):
            reason = reason.replace(secret_part, "***")
        raise ValueError(f"cannot be parsed ({reason})") from None
    return Secret(text)


def _password_parts(conninfo: str) -> list[str]:
    return url_passwords(conninfo)


_log_level = _choice("debug", "info", "warning", "error", "critical")

# The parsers a plugin's settings spec may use (docs/plugins.md): the same ones, so a plugin's
# variable is read exactly like a core one. A plugin may also pass any `str -> value` function
# that raises ValueError with the reason.
whole_number = _int
number = _float
boolean = _bool
choice = _choice
text = _text
secret_text = _secret_text


# ---------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------


def setting(
    env: str,
    default: Any,
    parse: Parser,
    doc: str,
    *,
    flag: str | None = None,
    secret: bool = False,
    fallback_env: str | None = None,
    credential: str | None = None,
    empty_ok: bool = False,
    excludes: str | None = None,
    show: Callable[[str], str] | None = None,
) -> Any:
    """One setting: a dataclass field carrying its variable, parser and documentation.

    ``parse`` turns the raw text into the value or raises ValueError with the reason (the
    message becomes ``VARIABLE='raw': reason``). ``secret``: the raw value is never shown.
    ``fallback_env``: another variable read when ``env`` is unset; ``credential``: then the
    systemd credential of that name. ``excludes``: a variable that may not be set together
    with this one (nor does the credential apply when it is). ``show``: how ``mf-worker
    config`` shows the value and how an error message shows a non-secret raw value (e.g.
    `mask_url_password` for a URL: everything but its password); a secret without it shows as
    ``***``. ``flag``: the CLI option (core settings only).
    """
    return field(
        default=default,
        metadata={
            "env": env,
            "parse": parse,
            "doc": doc,
            "flag": flag,
            "secret": secret,
            "fallback_env": fallback_env,
            "credential": credential,
            "empty_ok": empty_ok,
            "excludes": excludes,
            "show": show,
        },
    )


_setting = setting


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated configuration. Build it with :func:`load_settings`; never mutate it."""

    database_url: Secret | None = _setting(
        "MF_DATABASE_URL",
        None,
        _database_url,
        "PostgreSQL connection URL or libpq key=value string (falls back to `DATABASE_URL`, "
        "then to the systemd credential `mf_database_url`: the file "
        "`$CREDENTIALS_DIRECTORY/mf_database_url`). Required by every command that touches "
        "the database. Never logged.",
        flag="--database-url",
        secret=True,
        fallback_env="DATABASE_URL",
        credential="mf_database_url",
        show=mask_url_password,
    )
    concurrency: int = _setting(
        "MF_CONCURRENCY", 4, _int(1, 1024), "Queue items generated at once by one process.",
        flag="--concurrency",
    )
    poll_interval: float = _setting(
        "MF_POLL_INTERVAL",
        5.0,
        _float(0.01),
        "Seconds between claim polls when idle; the fallback behind LISTEN/NOTIFY, and what "
        "catches items that become due by the clock. Also the longest the publisher sleeps "
        "between looks (its timer is set to the next delivery instant).",
        flag="--poll-interval",
    )
    listen: bool = _setting(
        "MF_LISTEN",
        True,
        _bool,
        "LISTEN for new-item notifications. Turn off behind a transaction-mode pooler "
        "(PgBouncer, Supavisor), which cannot carry LISTEN: the worker then only polls.",
    )
    prepared_statements: bool = _setting(
        "MF_PREPARED_STATEMENTS",
        True,
        _bool,
        "Let psycopg prepare frequent queries. Turn off behind a transaction-mode pooler.",
    )
    pool_max_size: int | None = _setting(
        "MF_POOL_MAX_SIZE",
        None,
        _int(2, 1000),
        "Database connections one process may open (default: min(concurrency, 16) + 4; "
        "connections are held only while reading or writing, never during a generation). "
        "Count them against `max_connections` across all replicas.",
    )
    db_lock_timeout: float = _setting(
        "MF_DB_LOCK_TIMEOUT",
        5.0,
        _float(0.0),
        "Seconds a worker statement may wait for a row lock someone else holds (PostgreSQL "
        "`lock_timeout`) before it gives up and is retried; the heartbeat never waits, it "
        "skips locked rows. `0` sends no setting: behind a transaction-mode pooler, which "
        "rejects startup options, set it on the role instead (docs/database-roles.sql does).",
    )
    db_statement_timeout: float = _setting(
        "MF_DB_STATEMENT_TIMEOUT",
        30.0,
        _float(0.0),
        "Seconds one worker statement may run (PostgreSQL `statement_timeout`, and "
        "`idle_in_transaction_session_timeout` likewise) before it is cancelled and retried. "
        "`0` sends no setting (see `MF_DB_LOCK_TIMEOUT`). Sent on the worker's pooled "
        "connections (`run`, `run-once`, `schedule`); the role-level defaults of "
        "docs/database-roles.sql apply to every command that logs in as the worker role.",
    )
    lease_seconds: float = _setting(
        "MF_LEASE_SECONDS",
        120.0,
        _float(2.0),
        "How long a claimed item belongs to its worker without a heartbeat; the heartbeat "
        "extends it every third of this. A crashed worker's items return after it expires.",
    )
    max_attempts: int = _setting(
        "MF_MAX_ATTEMPTS", 3, _int(1, 100),
        "Workers lost on one item (its lease expired: a crash, a kill, a network partition) "
        "before the reaper marks it failed instead of returning it to the queue. Each lost "
        "worker books the attempt's reserved worst case as an estimate, so this bounds what lost "
        "workers cost an item. It bounds nothing else: permanent errors and invalid output fail "
        "an item at once, transient failures are bounded by `MF_RETRY_DEADLINE`, and rate "
        "limits and exhausted quotas use no attempt.",
    )
    generation_timeout: float = _setting(
        "MF_GENERATION_TIMEOUT",
        600.0,
        _float(0.1),
        "Seconds one generator call may take; a timeout counts as a retryable failure.",
    )
    shutdown_grace: float = _setting(
        "MF_SHUTDOWN_GRACE",
        30.0,
        _float(0.0),
        "Seconds in-flight items may take to finish after SIGTERM before they are handed back "
        "to the queue (without using up an attempt if their generator call had not started; "
        "a call that had started may have been billed: its reservation is booked as an "
        "estimate and the attempt stays used).",
    )
    retention_days: int = _setting(
        "MF_RETENTION_DAYS",
        30,
        _int(1),
        "Completed and cancelled queue items older than this are deleted (episodes and usage "
        "stay), except an item whose episode still waits for its delivery instant or whose "
        "slot has not come yet.",
    )
    max_episode_bytes: int = _setting(
        "MF_MAX_EPISODE_BYTES",
        1024 * 1024,
        _int(1024),
        "Largest episode (title, block contents and reasoning, UTF-8) a generator may return.",
    )
    generator: str = _setting(
        "MF_GENERATOR",
        "template",
        _text,
        "Generator plugin: an entry-point name (`template`, …) or `package.module:attr`.",
        flag="--generator",
    )
    fallback_generator: str | None = _setting(
        "MF_FALLBACK_GENERATOR",
        None,
        _text,
        "Fallback generator plugin (entry-point name or `package.module:attr`), used for an "
        "item only when the generator cannot serve it in time: its limit key is in a cooldown "
        "or a quota pause, or the item's last attempt failed transiently, and the item is due "
        "within `MF_FALLBACK_BEFORE`. The built-in `openai` reads its settings from the "
        "`MF_LLM_FALLBACK_*` variables. Unset: no fallback (docs/operations.md).",
    )
    fallback_before: float = _setting(
        "MF_FALLBACK_BEFORE",
        300.0,
        _float(0.0),
        "Seconds before an item's delivery instant from which it may go to the fallback "
        "generator (0: only once the instant has passed); an item with more time keeps "
        "waiting for the generator.",
    )
    pricing_file: Path | None = _setting(
        "MF_PRICING_FILE",
        None,
        _file,
        "TOML file of model prices (GBP per million prompt/completion tokens) that overrides "
        "and extends the shipped table; see docs/operations.md.",
    )
    daily_cost_limit_gbp: Decimal = _setting(
        "MF_DAILY_COST_LIMIT_GBP",
        Decimal("50"),
        _gbp,
        "Daily (UTC) spend limit per organisation in GBP, for organisations whose own "
        "`daily_cost_limit_gbp` is NULL.",
    )
    cost_reserve_gbp: Decimal = _setting(
        "MF_COST_RESERVE_GBP",
        Decimal("0.50"),
        _gbp,
        "Worst-case cost reserved per generation when the generator gives no estimate "
        "(`estimate_max_usage`).",
    )
    cost_limit_policy: str = _setting(
        "MF_COST_LIMIT_POLICY",
        "resume",
        _choice("resume", "skip"),
        "What happens to items blocked by the cost limit at the next UTC day: `resume` (run "
        "them as soon as possible) or `skip` (cancel them; each project gets its next regular "
        "occurrence).",
    )
    notifier: str = _setting(
        "MF_NOTIFIER",
        "log",
        _notifiers,
        "Who hears of a cost-limit trip (once per organisation per UTC day, retried until "
        "delivered): a comma-separated list of `log`, `webhook` (the operator), `email` (the "
        "organisation's users) and `package.module:attr`, e.g. `log,webhook,email`.",
    )
    notify_webhook_url: Secret | None = _setting(
        "MF_NOTIFY_WEBHOOK_URL",
        None,
        _url,
        "Where the `webhook` notifier POSTs its JSON (retried, 5 s timeout). Never logged.",
        secret=True,
    )
    smtp_url: Secret | None = _setting(
        "MF_SMTP_URL",
        None,
        _smtp_url,
        "`email` notifier: the SMTP server, `smtp://[user:password@]host[:587]` (STARTTLS when "
        "offered; `?starttls=require` insists, `?starttls=off` never) or "
        "`smtps://…[:465]` (TLS from the start). A password is only ever sent encrypted. "
        "Never logged.",
        secret=True,
        show=mask_url_password,
    )
    mail_from: str | None = _setting(
        "MF_MAIL_FROM",
        None,
        parse_address,
        "`email` notifier: the sender, e.g. `Many Futures <costs@example.org>`.",
    )
    mail_to: tuple[str, ...] | None = _setting(
        "MF_MAIL_TO",
        None,
        parse_address_list,
        "`email` notifier: comma-separated addresses that get every organisation's mail "
        "instead of its users (e.g. a support inbox, or a worker role that may not read users' "
        "addresses).",
    )
    mail_database_url: Secret | None = _setting(
        "MF_MAIL_DATABASE_URL",
        None,
        _database_url,
        "`email` notifier without `MF_MAIL_TO`: the login of the mail role "
        "(docs/database-roles.sql with `-v mail_password=…`; also read: the systemd credential "
        "`mf_mail_database_url`), the one role that reads users' addresses, and only an "
        "organisation's whose limit tripped today and that has not been told yet. The worker "
        "role never can. Unset: read through `MF_DATABASE_URL` (the schema owner, in "
        "development). Never logged.",
        secret=True,
        credential="mf_mail_database_url",
        show=mask_url_password,
    )
    llm_requests_per_minute: float | None = _setting(
        "MF_LLM_REQUESTS_PER_MINUTE", None, _float(0.0, exclusive=True),
        "The provider's request limit per minute for the generator's limit key (the `openai` "
        "generator: base URL and model), shared by every worker through the database; the "
        "fleet paces itself at 95 % of it. Unset: not known (429s and an adaptive window "
        "per key do the pacing).",
    )
    llm_tokens_per_minute: float | None = _setting(
        "MF_LLM_TOKENS_PER_MINUTE", None, _float(0.0, exclusive=True),
        "The provider's token limit per minute (prompt plus completion) for the limit key, "
        "shared like `MF_LLM_REQUESTS_PER_MINUTE`; each call is charged its worst case "
        "(`estimate_max_usage`) and corrected with its real usage. Unset: not known.",
    )
    llm_fallback_requests_per_minute: float | None = _setting(
        "MF_LLM_FALLBACK_REQUESTS_PER_MINUTE", None, _float(0.0, exclusive=True),
        "Like `MF_LLM_REQUESTS_PER_MINUTE`, for the fallback generator's own limit key.",
    )
    llm_fallback_tokens_per_minute: float | None = _setting(
        "MF_LLM_FALLBACK_TOKENS_PER_MINUTE", None, _float(0.0, exclusive=True),
        "Like `MF_LLM_TOKENS_PER_MINUTE`, for the fallback generator's own limit key.",
    )
    retry_deadline: float = _setting(
        "MF_RETRY_DEADLINE", 4 * 3600.0, _float(0.0),
        "Seconds after an item was first picked up during which transient failures (timeouts, "
        "5xx, dropped or refused connections) are retried with backoff (1 s, 2 s, 4 s … capped "
        "at 5 minutes); never past the project's next occurrence; then the item fails. Each "
        "retry books what its calls cost: nothing for a call the provider refused (a 5xx, a "
        "refused connection), its real usage for one it answered, the call's worst case "
        "(estimated) for one it may have run (a timeout). Rate limits and exhausted quotas "
        "never fail an item and use no attempt.",
    )
    org_max_in_flight: int | None = _setting(
        "MF_ORG_MAX_IN_FLIGHT", None, _int(1, 100_000),
        "Most items of one organisation processing at once across the fleet (unset: no cap; "
        "claims are fair across organisations either way).",
    )
    scheduler_interval: float = _setting(
        "MF_SCHEDULER_INTERVAL",
        30.0,
        _float(0.1),
        "Seconds between scheduler passes of the whole fleet: one replica (whichever takes the "
        "advisory lock) plans per interval, looking only at the projects that changed.",
    )
    scheduler_sweep_interval: float = _setting(
        "MF_SCHEDULER_SWEEP_INTERVAL",
        3600.0,
        _float(1.0),
        "Seconds between the scheduler's full sweeps, the safety net that re-checks every active "
        "project instead of the changed ones (its cost grows with the number of projects).",
    )
    lead_seconds: float = _setting(
        "MF_LEAD_SECONDS",
        900.0,
        _float(0.0, maximum=21600.0),
        "How long before its delivery instant an episode may be generated (the lead window): "
        "the scheduler sets `run_after = scheduled_for - lead`, claims take items at or past "
        "their instant first (then the fair turn, then the earliest deadline), and an episode "
        "finished early stays `scheduled` until the publisher makes it `ready` at the instant. "
        "`0` generates at the delivery instant. At most 21600 (6 h): "
        "shorter than the gap between two occurrences (a day at least), so finishing one "
        "episode never makes the next one claimable at once.",
    )
    worker_id: str = _setting(
        "MF_WORKER_ID",
        "",
        _text,
        "Name this process claims items under (default: hostname:pid). Must be unique.",
    )
    metrics_addr: str = _setting(
        "MF_METRICS_ADDR",
        "0.0.0.0:9464",
        _optional_addr,
        "host:port of the HTTP server for /metrics, /healthz and /readyz. Port 0 picks a free "
        "port (logged as `http_listening`); an empty value disables the server.",
        empty_ok=True,
    )
    health_stall_seconds: float = _setting(
        "MF_HEALTH_STALL_SECONDS",
        120.0,
        _float(1.0),
        "/healthz answers 503 when the claim loop has not gone round for this long (under "
        "systemd, the watchdog is fed only from the claim loop, so `WatchdogSec=` decides "
        "when a wedged worker is restarted).",
    )
    health_starved_seconds: float = _setting(
        "MF_HEALTH_STARVED_SECONDS",
        60.0,
        _float(1.0),
        "/healthz answers 503, and the systemd watchdog is no longer fed, when the worker has "
        "had free slots for this long without claiming anything while it should: its claims "
        "fail (the database is unreachable or read-only, the queue table is locked), come "
        "back empty although items it may take are due, or flow control admits none while it "
        "holds nothing. Due items that no claim may take (`MF_ORG_MAX_IN_FLIGHT`, a "
        "provider's cooldown) do not count. See docs/operations.md, MfWorkerNotClaiming.",
    )
    log_format: str = _setting(
        "MF_LOG_FORMAT",
        "auto",
        _choice("auto", "json", "console"),
        "`json` lines, `console` (readable), or `auto`: console on a terminal, else json.",
        flag="--log-format",
    )
    log_level: str = _setting(
        "MF_LOG_LEVEL", "info", _log_level, "debug, info, warning, error or critical.",
        flag="--log-level",
    )
    # Not settings themselves: the registered plugins' settings, parsed (entry-point name to
    # spec instance), and the environment they came from, which `plugin` parses for a spec that
    # is not registered. Neither shows in a repr.
    plugins: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    plugin_environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # The same for the fallback instance (specs with an ``ENV_PREFIX`` only), and the role a
    # plugin given these settings plays (None: the generator; `FALLBACK_ROLE`: the fallback).
    fallback_plugins: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    plugin_role: str | None = field(default=None, repr=False, compare=False)

    @property
    def notifiers(self) -> tuple[str, ...]:
        """``MF_NOTIFIER`` as a list of names."""
        return tuple(self.notifier.split(","))

    def __post_init__(self) -> None:
        if not self.worker_id:
            object.__setattr__(self, "worker_id", _default_worker_id())

    @property
    def pool_size(self) -> int:
        """Connections for one process. Items hold one only to prepare and to write (never
        while generating), so far fewer than ``concurrency`` suffice; +4 for the loops."""
        return self.pool_max_size or min(self.concurrency, 16) + 4

    def require_database_url(self) -> str:
        """The database URL, or a ConfigError that says how to give one."""
        if self.database_url is None:
            raise ConfigError(
                "MF_DATABASE_URL is not set: give a PostgreSQL URL in MF_DATABASE_URL or "
                "DATABASE_URL (or the systemd credential mf_database_url), or pass "
                "--database-url"
            )
        return self.database_url.reveal()

    def plugin(self, spec: type[T]) -> T:
        """A plugin's settings: an instance of ``spec``, a dataclass of `setting` fields.

        A spec registered under ``mf_worker.settings`` was parsed and validated by
        `load_settings`; any other is parsed now, from the same variables, by the same parser.
        Raises ConfigError naming the variable and the bad value.
        """
        parsed_specs = self.fallback_plugins if self.plugin_role else self.plugins
        for parsed in parsed_specs.values():
            if type(parsed) is spec:
                return parsed
        return parse_plugin_settings(spec, self.plugin_environ, role=self.plugin_role)

    def as_fallback(self) -> Settings:
        """These settings as the fallback generator's instance sees them: `plugin` reads the
        spec's ``FALLBACK_`` variables (``MF_LLM_FALLBACK_MODEL`` for ``MF_LLM_MODEL``)."""
        return dataclasses.replace(self, plugin_role=FALLBACK_ROLE)

    def plugin_variable(self, spec: type[Any], name: str) -> str:
        """The variable that the setting ``name`` of ``spec`` is read from in this role (for
        messages: ``MF_LLM_FALLBACK_MODEL is not set``)."""
        for f in dataclasses.fields(spec):
            if f.name == name and _is_setting(f):
                return str(_role_meta(spec, f, self.plugin_role)["env"])
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """What an operator needs to know about one setting (for docs and diagnostics)."""

    name: str
    env: str
    default: Any
    doc: str
    flag: str | None
    secret: bool
    fallback_env: str | None
    plugin: str | None = None
    """The entry-point name of the plugin whose setting this is; None for a core setting."""
    role: str | None = None
    """`FALLBACK_ROLE` for the fallback instance's copy of a plugin setting."""
    show: Callable[[str], str] | None = None
    """How the value is shown (`setting`'s ``show``)."""

    def value_in(self, settings: Settings) -> Any:
        """This setting's value in ``settings``."""
        if self.plugin is None:
            owner: Any = settings
        elif self.role is not None:
            owner = settings.fallback_plugins[self.plugin]
        else:
            owner = settings.plugins[self.plugin]
        return getattr(owner, self.name)

    def shown_in(self, settings: Settings) -> Any:
        """The value as ``mf-worker config`` shows it: a secret as ``***`` (or, with a
        ``show``, e.g. a URL with its password masked), and any other text through
        `logs.mask`, so a password in any URL-valued setting, core or plugin, never shows."""
        value = self.value_in(settings)
        if value is None:
            return None
        raw = value.reveal() if isinstance(value, Secret) else value
        if self.show is not None and isinstance(raw, str):
            return mask(self.show(raw))
        if self.secret or isinstance(value, Secret):
            return "***"
        return mask(value) if isinstance(value, str | tuple) else value


def settings_secrets(settings: Settings) -> list[str]:
    """Every secret ``settings`` hold, for `logs.register_secret`: the whole value of each
    secret setting, and the password in every setting's value that is a URL or a libpq string
    (core and plugin settings alike), as written and decoded."""
    found: list[str] = []
    for info in describe_settings():
        value = info.value_in(settings)
        raw = value.reveal() if isinstance(value, Secret) else value
        if not isinstance(raw, str):
            continue
        if info.secret or isinstance(value, Secret):
            found.append(raw)
        found += url_passwords(raw)
    return list(dict.fromkeys(found))


def _is_setting(f: dataclasses.Field[Any]) -> bool:
    return "env" in f.metadata


def _infos(spec: type[Any], plugin: str | None, role: str | None = None) -> list[SettingInfo]:
    infos = []
    for f in dataclasses.fields(spec):
        if not _is_setting(f):
            continue
        meta = _role_meta(spec, f, role)
        infos.append(SettingInfo(
            name=f.name,
            env=meta["env"],
            default=f.default,
            doc=(meta["doc"] if role is None else
                 f"Fallback generator (`MF_FALLBACK_GENERATOR={plugin}`): like "
                 f"`{f.metadata['env']}`, for the fallback instance."),
            flag=meta["flag"],
            secret=meta["secret"],
            fallback_env=meta["fallback_env"],
            plugin=plugin,
            role=role,
            show=meta.get("show"),
        ))
    return infos


def _fallback_prefix(spec: type[Any]) -> str | None:
    """The prefix a spec declares for its variables (``ENV_PREFIX``), if any: then it has a
    fallback set of them."""
    prefix = getattr(spec, "ENV_PREFIX", None)
    return prefix if isinstance(prefix, str) and prefix else None


def _role_name(prefix: str, name: str | None) -> str | None:
    """``MF_LLM_MODEL`` → ``MF_LLM_FALLBACK_MODEL`` (``mf_llm_api_key`` likewise, in lower
    case); a name without the prefix is kept."""
    if name is None:
        return None
    for pre, infix in ((prefix, _FALLBACK_INFIX), (prefix.lower(), _FALLBACK_INFIX.lower())):
        if name.startswith(pre):
            return pre + infix + name[len(pre):]
    return name


def _role_meta(spec: type[Any], f: dataclasses.Field[Any], role: str | None
               ) -> Mapping[str, Any]:
    """A field's metadata as the instance of ``role`` reads it: the fallback's variables,
    credential and excluded variable carry ``FALLBACK_`` after the spec's prefix."""
    prefix = _fallback_prefix(spec)
    if role is None or prefix is None:
        return f.metadata
    meta = dict(f.metadata)
    for key in ("env", "fallback_env", "credential", "excludes"):
        meta[key] = _role_name(prefix, meta.get(key))
    return meta


def describe_settings() -> list[SettingInfo]:
    """Every setting with its variable, default and documentation: the core settings in
    declaration order, then each registered plugin's, by plugin name."""
    infos = _infos(Settings, None)
    specs = registered_plugin_settings()
    for name, spec in specs.items():
        infos += _infos(spec, name)
    for name, spec in specs.items():
        if _fallback_prefix(spec) is not None:
            infos += _infos(spec, name, FALLBACK_ROLE)
    return infos


def registered_plugin_settings() -> dict[str, type[Any]]:
    """The settings specs registered under ``mf_worker.settings``, by entry-point name.

    Raises ConfigError when one cannot be imported or is not a dataclass of `setting` fields.
    """
    specs: dict[str, type[Any]] = {}
    for name, target in sorted(entry_point_targets(PLUGIN_SETTINGS_GROUP).items()):
        try:
            spec = import_target(name, target, kind="plugin settings")
        except PluginLoadError as exc:
            raise ConfigError(str(exc)) from None
        if not (isinstance(spec, type) and dataclasses.is_dataclass(spec)):
            raise ConfigError(f"plugin settings {name!r}: {target} is not a dataclass")
        specs[name] = spec
    return specs


def parse_plugin_settings(spec: type[T], environ: Mapping[str, str], *,
                          role: str | None = None) -> T:
    """An instance of the plugin settings ``spec`` from ``environ``, parsed like a core
    setting (``role``: `FALLBACK_ROLE` reads the fallback's variables, when the spec declares
    an ``ENV_PREFIX``). Raises ConfigError naming the variable and the bad value."""
    if not dataclasses.is_dataclass(spec):
        raise TypeError(f"{spec!r} is not a dataclass of setting() fields")
    return spec(**_read_fields(spec, dict(environ), {}, role=role))


def _flag_or_env(f: dataclasses.Field[Any], from_flag: bool) -> str:
    name: str = f.metadata["flag"] if from_flag and f.metadata["flag"] else f.metadata["env"]
    return name


def _shown(value: str, f: dataclasses.Field[Any]) -> str:
    """How an error message quotes a raw value: never a secret's, never a URL's password."""
    if f.metadata["secret"]:
        return "'***'"
    show = f.metadata.get("show")
    return repr(mask(show(value) if show else value))


def _credential(name: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    """A non-empty systemd credential and how errors should name it, or None."""
    source = f"$CREDENTIALS_DIRECTORY/{name}"
    try:
        value = read_credential(name, env)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{source}: cannot read the credential ({reason})") from None
    return (value, source) if value and value.strip() else None


def _read_fields(
    spec: type[Any], env: Mapping[str, str], overrides: Mapping[str, Any], *,
    role: str | None = None,
) -> dict[str, Any]:
    """The values of ``spec``'s `setting` fields that are given (flag, variable, fallback
    variable or credential), parsed: the one parser of core and plugin settings alike."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if not _is_setting(f):
            continue
        name, meta = f.name, _role_meta(spec, f, role)
        own = env.get(meta["env"], "") != "" or (meta["env"] in env and meta.get("empty_ok"))
        excluded = meta.get("excludes") and env.get(meta["excludes"], "") != ""
        if own and excluded and name not in overrides:
            raise ConfigError(f"{meta['env']} and {meta['excludes']} are both set; set only one")
        if name in overrides:
            raw, source = overrides[name], _flag_or_env(f, from_flag=True)
        elif own:
            raw, source = env[meta["env"]], meta["env"]
        elif meta["fallback_env"] and env.get(meta["fallback_env"], "") != "":
            raw, source = env[meta["fallback_env"]], meta["fallback_env"]
        elif (meta["credential"] and not excluded
              and (found := _credential(meta["credential"], env)) is not None):
            raw, source = found
        else:
            continue
        if not isinstance(raw, str):
            values[name] = raw
            continue
        try:
            values[name] = meta["parse"](raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={_shown(raw, f)}: {exc}") from None
    return values


def load_settings(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Settings, list[str]]:
    """Build the settings from environment variables, then CLI overrides.

    A setting with a systemd credential (the database URL) falls back to
    ``$CREDENTIALS_DIRECTORY/<credential>`` when neither its variable nor its fallback variable
    is set; ``$CREDENTIALS_DIRECTORY`` is taken from ``environ`` like everything else. The
    settings of every plugin registered under ``mf_worker.settings`` are parsed too.

    ``overrides`` maps field names to raw strings (from flags) or already-typed values; ``None``
    values are ignored. Returns the settings and a list of warnings (unknown ``MF_`` variables),
    which the caller logs once logging is configured. Raises ConfigError naming the variable (or
    flag) and the bad value; secrets are never shown.
    """
    env = dict(os.environ if environ is None else environ)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    fields = {f.name: f for f in dataclasses.fields(Settings) if _is_setting(f)}
    unknown_overrides = set(overrides) - set(fields)
    if unknown_overrides:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown_overrides))}")

    values = _read_fields(Settings, env, overrides)
    # Kept whole: a plugin's variables need not start with MF_ (hidden from repr).
    plugin_environ = dict(env)
    specs = registered_plugin_settings()
    plugins = {name: parse_plugin_settings(spec, plugin_environ) for name, spec in specs.items()}
    fallback_plugins = {
        name: parse_plugin_settings(spec, plugin_environ, role=FALLBACK_ROLE)
        for name, spec in specs.items() if _fallback_prefix(spec) is not None}

    known_env = {f.metadata["env"] for f in fields.values()} | _KNOWN_NON_SETTINGS
    known_env |= {_role_meta(spec, f, role)["env"] for spec in specs.values()
                  for role in (None, FALLBACK_ROLE)
                  for f in dataclasses.fields(spec) if _is_setting(f)}
    warnings = [
        f"unknown variable {key} is ignored (known: see `mf-worker config`)"
        for key in sorted(env)
        if key.startswith(ENV_PREFIX) and key not in known_env
    ]
    return Settings(**values, plugins=MappingProxyType(plugins),
                    plugin_environ=MappingProxyType(plugin_environ),
                    fallback_plugins=MappingProxyType(fallback_plugins)), warnings

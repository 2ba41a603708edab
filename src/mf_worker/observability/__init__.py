"""Observability: what an operator and the service manager see of a running daemon.

* ``metrics`` — every Prometheus metric, fed by subscriptions to the event hub
  (``engine.events``);
* ``queue_depth`` — the queue's depth read from the database at scrape time (and by
  ``mf-worker status``);
* ``health`` — the HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``;
* ``systemd`` — sd_notify (READY, STOPPING, the watchdog) and credentials, standard library
  only.
"""

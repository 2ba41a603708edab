"""Maintenance: the background loops every ``mf-worker run`` keeps going beside the claim loop.

One module per loop, all of one shape (``loop.py``): a validated config dataclass with its
defaults, ``run_once(now)`` that does one pass and returns what it did (tests call it
directly), ``run()`` that repeats it until ``stop()``.

* ``heartbeat`` — extends the leases of this worker's claims in flight;
* ``reaper`` — returns items whose lease expired (their worker died);
* ``pruner`` — deletes finished queue items past the retention;
* ``scheduler`` — plans each active project's next item (the planning is ``scheduling/``);
* ``budget`` — releases cost-blocked items and re-sends failed trip notifications (the cost
  rules are ``cost/``);
* ``publisher`` — makes episodes finished early visible at their delivery instant;
* ``listener`` — LISTEN on the queue's channel to wake idle workers at once.

The layering: maintenance sits above the engine (the heartbeat serves the worker's claims, the
reaper records lost attempts in episode histories, loops publish on ``engine.events``) and
below the daemon that wires everything (``mf_worker.daemon``).
"""

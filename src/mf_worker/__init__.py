"""mf-worker: the daemon that schedules and writes Many Futures episodes from a PostgreSQL queue."""

__version__ = "0.1.0"

__all__ = ["__version__"]

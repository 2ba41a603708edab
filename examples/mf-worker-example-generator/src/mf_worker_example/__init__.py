"""An example mf-worker generator plugin; see `mf_worker_example.generator`."""

from mf_worker_example.generator import DigestGenerator

__all__ = ["DigestGenerator"]

"""Scheduling: turning a project's cadence, delivery time and zone into the next due instant."""

from mf_worker.scheduling.cadence import Cadence, CadenceError, next_occurrence, parse_cadence

__all__ = ["Cadence", "CadenceError", "next_occurrence", "parse_cadence"]

"""Resident-memory probes for the benchmarks: the core's `alignprop_core.planning.host_memory`
helpers under the names the bench workers use (one copy of the /proc reading)."""
from __future__ import annotations

from alignprop_core.planning.host_memory import peak_rss_bytes, reset_peak, rss_bytes, trim_heap

__all__ = ["peak_rss_bytes", "reset_peak", "rss_bytes", "trim_heap"]

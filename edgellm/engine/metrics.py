"""Engine metrics: counters, gauges and latency histograms (rendered as Prometheus text by serve)."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> dict:
        cumulative, acc = [], 0
        for c in self.counts[:-1]:
            acc += c
            cumulative.append(acc)
        return {"buckets": list(zip(self.buckets, cumulative)), "sum": self.total, "count": self.count}


class EngineMetrics:
    """Updated by the engine thread; `snapshot()` is safe from any thread."""

    COUNTERS = ("requests_total", "requests_finished", "requests_cancelled", "requests_failed",
                "prompt_tokens_total", "prefill_tokens_total", "cached_tokens_total",
                "generation_tokens_total", "steps_total", "spec_draft_tokens_total", "spec_accepted_tokens_total")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.last_prefill_tps = 0.0
        self.last_decode_tps = 0.0

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            getattr(self, name).observe(value)

    def snapshot(self, gauges: dict | None = None) -> dict:
        with self._lock:
            out = dict(self.counters)
            out["time_to_first_token_seconds"] = self.ttft.snapshot()
            out["inter_token_latency_seconds"] = self.itl.snapshot()
            out["request_latency_seconds"] = self.e2e.snapshot()
            out["last_prefill_tokens_per_s"] = self.last_prefill_tps
            out["last_decode_tokens_per_s"] = self.last_decode_tps
            drafted = self.counters["spec_draft_tokens_total"]
            out["spec_acceptance_rate"] = self.counters["spec_accepted_tokens_total"] / drafted if drafted else 0.0
        out.update(gauges or {})
        return out

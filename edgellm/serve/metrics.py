"""Engine metrics in the Prometheus text exposition format."""

from __future__ import annotations

COUNTERS = {
    "requests_total": "Requests received",
    "requests_finished": "Requests finished normally",
    "requests_cancelled": "Requests cancelled (client gone or aborted)",
    "requests_failed": "Requests that failed inside the engine",
    "prompt_tokens_total": "Prompt tokens received",
    "prefill_tokens_total": "Prompt tokens computed (not reused from cache)",
    "cached_tokens_total": "Prompt tokens reused from the KV cache",
    "generation_tokens_total": "Tokens generated",
    "steps_total": "Engine steps run",
    "spec_draft_tokens_total": "Speculative tokens drafted and verified",
    "spec_accepted_tokens_total": "Speculative drafted tokens accepted",
}
GAUGES = {
    "requests_running": "Sequences being generated",
    "requests_waiting": "Sequences waiting for a slot",
    "kv_cache_tokens_active": "Positions held in the KV cache by running sequences",
    "kv_cache_tokens_free": "Positions that still fit the KV-cache budget",
    "kv_cache_bytes_used": "KV-cache bytes allocated",
    "kv_cache_bytes_budget": "KV-cache byte budget",
    "kv_cache_sequences": "Sequences holding KV cache",
    "kv_cache_tokens_prefix_cache": "Tokens kept for prefix reuse",
    "preemptions_total": "Sequences preempted for lack of KV memory",
    "spec_acceptance_rate": "Accepted / drafted speculative tokens since start",
}
HISTOGRAMS = {
    "time_to_first_token_seconds": "Time from request to first generated token",
    "inter_token_latency_seconds": "Time between generated tokens",
    "request_latency_seconds": "Time from request to completion",
}


def render_prometheus(metrics: dict, prefix: str = "edgellm_") -> str:
    lines: list[str] = []
    for name, help_text in COUNTERS.items():
        lines += [f"# HELP {prefix}{name} {help_text}", f"# TYPE {prefix}{name} counter",
                  f"{prefix}{name} {metrics.get(name, 0)}"]
    for name, help_text in GAUGES.items():
        lines += [f"# HELP {prefix}{name} {help_text}", f"# TYPE {prefix}{name} gauge",
                  f"{prefix}{name} {metrics.get(name, 0)}"]
    for name, help_text in HISTOGRAMS.items():
        h = metrics.get(name) or {"buckets": [], "sum": 0.0, "count": 0}
        lines += [f"# HELP {prefix}{name} {help_text}", f"# TYPE {prefix}{name} histogram"]
        for le, count in h["buckets"]:
            lines.append(f'{prefix}{name}_bucket{{le="{le}"}} {count}')
        lines.append(f'{prefix}{name}_bucket{{le="+Inf"}} {h["count"]}')
        lines += [f"{prefix}{name}_sum {h['sum']}", f"{prefix}{name}_count {h['count']}"]
    return "\n".join(lines) + "\n"

"""Prometheus metrics of one server (its own registry, so several servers can live in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the HTTP layer)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class ServingMetrics:
    """Counters, gauges and histograms; the scheduler and the HTTP layer update them."""

    def __init__(self, slots: int, num_draft: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("quasar_requests", "Requests by outcome (finished, cancelled, rejected, "
                                "invalid, error)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("quasar_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("quasar_generated_tokens", "Tokens generated", registry=r)
        self.verify_steps = Counter("quasar_verify_steps", "Verify steps, summed over active rows", registry=r)
        self.accepted_length = Histogram(
            "quasar_accepted_length", "Tokens emitted by one verify step of one row (tau = mean)",
            buckets=tuple(float(n) for n in range(1, num_draft + 2)), registry=r)
        self.ttft = Histogram("quasar_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("quasar_time_per_output_token_seconds",
                              "(last token - first token) / (tokens - 1) per request", buckets=_TPOT_BUCKETS,
                              registry=r)
        self.latency = Histogram("quasar_request_latency_seconds", "Arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("quasar_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("quasar_slots_busy", "Slots holding a request", registry=r)
        self.slots_total = Gauge("quasar_slots_total", "Slots (batch rows)", registry=r)
        self.slots_total.set(slots)
        self.loop_iterations = Counter("quasar_loop_iterations", "Device loop iterations", registry=r)
        self.busy_slot_iterations = Counter(
            "quasar_busy_slot_iterations", "Loop iterations x busy slots (occupancy = this / "
            "(loop_iterations x slots_total))", registry=r)
        self.chunks = Counter("quasar_chunks", "Device chunks by program: its kind (ar, chain, tree) and "
                              "draft length K (--speculation auto switches between them)", ["program", "k"],
                              registry=r)
        self.alpha = Gauge("quasar_acceptance_alpha", "Per-token draft acceptance estimated by the "
                           "speculation policy (NaN for a fixed --speculation)", registry=r)
        for outcome in ("finished", "cancelled", "rejected", "invalid", "error"):
            self.requests.labels(outcome)

    def watch_pages(self, stats) -> None:
        """Paged KV: gauges read from ``stats()`` (``quasar_jax.serving.kv_pages.SlotPages.stats``)
        at every scrape (the token, eviction and preemption figures are running totals)."""
        r = self.registry
        for key, text in (("pages_used", "KV pages held by running requests or staging"),
                          ("pages_free", "KV pages free or evictable (cached, unreferenced)"),
                          ("pages_cached", "Unreferenced KV pages kept for prefix hits"),
                          ("pages_total", "KV pages in the pool"),
                          ("prefix_queried_tokens", "Prompt tokens looked up in the prefix cache (total)"),
                          ("prefix_hit_tokens", "Prompt tokens found in the prefix cache (total)"),
                          ("evictions", "Cached KV pages evicted (total)"),
                          ("preemptions", "Running requests preempted for lack of KV pages (total)")):
            Gauge(f"quasar_kv_{key}", text, registry=r).set_function(lambda key=key: stats()[key])

    def render(self) -> bytes:
        return generate_latest(self.registry)

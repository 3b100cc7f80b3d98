"""Prometheus metrics, one registry per app (so tests can build several apps). Names are fixed: the
Grafana dashboard reads them. Label values stay bounded: an unplugged expert's series are removed."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moe import BASE_ROUTE

SHARE_BUCKETS = tuple(round(i * 0.05, 2) for i in range(21))  # 0, 0.05, ..., 1.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
STORE_USAGE_MAX_AGE_S = 10.0  # a scrape reads the store's listing at most this often


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_expert_share = Histogram(
            "plugmoe_request_expert_share",
            "Per finished request, each route's share of its (token, layer) routing decisions",
            ["expert"],
            buckets=SHARE_BUCKETS,
            registry=r,
        )
        self.routed_tokens = Counter(
            "plugmoe_routed_tokens",
            "(token, layer) routing decisions per route and layer",
            ["expert", "layer"],
            registry=r,
        )
        self.routing_entropy = Histogram(
            "plugmoe_routing_entropy_bits",
            "Per finished request, entropy (bits) of its route shares",
            buckets=(0, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8),
            registry=r,
        )
        self.experts_plugged = Gauge("plugmoe_experts_plugged", "Experts plugged now", registry=r)
        self.expert_set_version = Gauge(
            "plugmoe_expert_set_version", "Expert-set version served (the expert store's manifest version)", registry=r
        )
        self.expert_store_errors = Counter(
            "plugmoe_expert_store_errors", "Failed reads of the expert store while following it", registry=r
        )
        self.expert_info = Gauge("plugmoe_expert_info", "1 per plugged expert", ["expert"], registry=r)
        self.plug_duration = Histogram(
            "plugmoe_plug_duration_seconds",
            "Time to plug (validate, admit, swap) or unplug an expert",
            ["action"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.plug_operations = Counter(
            "plugmoe_plug_operations", "Plug, replace and unplug operations by result", ["action", "result"], registry=r
        )
        self.requests = Counter(
            "plugmoe_requests", "HTTP requests by route template and status", ["endpoint", "status"], registry=r
        )
        self.time_to_first_token = Histogram(
            "plugmoe_time_to_first_token_seconds",
            "From submission to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "plugmoe_inter_token_latency_seconds",
            "Between two generated tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "plugmoe_request_duration_seconds",
            "End-to-end request latency",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("plugmoe_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("plugmoe_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.queue_depth = Gauge("plugmoe_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Histogram(
            "plugmoe_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.running_sequences = Gauge("plugmoe_running_sequences", "Sequences in the running batch", registry=r)
        self.request_expert_share.labels(expert=BASE_ROUTE)
        # the expert store's size (read at most every STORE_USAGE_MAX_AGE_S, on a scrape, and after a collection)
        self.store_files = Gauge("plugmoe_expert_store_files", "Expert files in the expert store", registry=r)
        self.store_bytes = Gauge("plugmoe_expert_store_bytes", "Bytes of expert files in the expert store", registry=r)
        self.store_served_bytes = Gauge(
            "plugmoe_expert_store_served_bytes",
            "Bytes of the expert files the served expert-set version names (the rest is history or garbage)",
            registry=r,
        )
        self.store_manifests = Gauge(
            "plugmoe_expert_store_manifests", "Expert-set versions (manifests) in the expert store", registry=r
        )
        self.expert_store_deleted = Counter(
            "plugmoe_expert_store_deleted_files",
            "Expert files this server deleted from the store, by reason (purge, gc)",
            ["reason"],
            registry=r,
        )

    def expert_plugged(self, name: str, layers: int, plugged_count: int) -> None:
        """A new expert: its info series, and its routed-tokens series at 0 on every layer (so experts that
        routed nothing are queryable)."""
        self.expert_info.labels(expert=name).set(1)
        for layer in range(layers):
            self.routed_tokens.labels(expert=name, layer=str(layer))
        self.experts_plugged.set(plugged_count)

    def expert_unplugged(self, name: str, layers: int, plugged_count: int) -> None:
        for metric in (self.expert_info, self.request_expert_share):
            with contextlib.suppress(KeyError):
                metric.remove(name)
        for layer in range(layers):
            with contextlib.suppress(KeyError):
                self.routed_tokens.remove(name, str(layer))
        self.experts_plugged.set(plugged_count)

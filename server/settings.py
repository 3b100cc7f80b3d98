"""Service settings: one pydantic-settings class; every field is a `plugmoe serve` flag and a PLUGMOE_* env var.

The built-in demo (folder demo/ beside the packages) is plain data here: its model and expert files are
located by path, never imported.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moe.admission.report import DEFAULT_CALIBRATION, LIMIT_HELP, AdmissionLimits

INSTALL_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = INSTALL_ROOT / "demo" / "model"
DEMO_EXPERTS_DIR = INSTALL_ROOT / "demo" / "experts"
DEMO_SOURCE_ROOTS = (DEMO_EXPERTS_DIR, INSTALL_ROOT / "demo" / "compare")  # shipped, read-only expert files
DEMO_MODEL_NAME = "plugmoe-demo"


def user_data_dir() -> Path:
    """Where plugmoe keeps what it writes at run time: $XDG_DATA_HOME/plugmoe (~/.local/share/plugmoe)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "plugmoe"


def _admission_limit(name: str) -> Any:
    """An admission limit's setting: AdmissionLimits' default and help; None or negative turns it off."""
    return Field(getattr(AdmissionLimits, name), description=f"{LIMIT_HELP[name]}; None or negative: off")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PLUGMOE_", protected_namespaces=())

    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="listen port")
    model: str = Field(
        str(DEMO_MODEL_DIR), description="backbone: a local directory or a hub id (default: the built-in demo model)"
    )
    model_name: str | None = Field(None, description="name in /v1/models (default: the model dir's name)")
    experts_dir: Path | None = Field(
        None,
        description="the expert store: plugged experts persist here (default: $XDG_DATA_HOME/plugmoe/<model "
        "name>/experts, i.e. ~/.local/share/plugmoe/...)",
    )
    expert_store: str | None = Field(
        None,
        description="the expert store as a URL, shared by every server or replica that serves one expert set: a "
        "directory, file://..., s3://bucket/prefix (needs s3fs: pip install 'plugmoe[s3]') or another fsspec URL "
        "(default: --experts-dir)",
    )
    expert_store_options: str | None = Field(
        None,
        description='fsspec storage options of --expert-store as a JSON object, e.g. {"endpoint_url": '
        '"http://127.0.0.1:9000"} (default: none; s3 credentials come from the usual AWS variables and profiles)',
    )
    poll_interval_s: float = Field(
        1.0, ge=0, description="seconds between reads of the expert store to follow other writers (0: never)"
    )
    seed_experts: Path | None = Field(
        None,
        description="expert files plugged on first start, when the store is empty (default: the demo experts "
        "with the demo model)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when present, else cpu")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model weights dtype")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    max_batch_size: int = Field(16, ge=1, description="sequences decoded together")
    max_queue: int = Field(64, ge=0, description="waiting requests beyond the running batch; past it, 503")
    fair_share_ratio: int | None = Field(
        None,
        ge=0,
        description="while several clients have work, a decode step runs at most this many rows per row of the "
        "client that wants fewest, split max-min fairly; rows over a client's share are preempted and resume "
        "later (prompt and tokens so far re-prefilled). 0: off. Unset: 2 on a CPU, where a step's cost grows with "
        "its rows, off on a GPU (bench/fair_share.py, bench/fairness.py)",
    )
    max_prefill_tokens: int = Field(
        512,
        ge=1,
        description="prompt tokens prefilled between two decode steps: waiting requests past it start at the next "
        "step, so running streams are not held behind a long burst of prompts (a longer prompt still starts, alone). "
        "512 starts a burst of 16 short prompts (33 tokens) in one prefill after the first: 16 streaming clients on "
        "the demo model (CPU) got 1.06x the tokens/s of 256 with TTFT p50 alike and p99 lower (bench/peer.py "
        "--baseline, 16 rounds); a GPU's cheap prefill may take more",
    )
    max_new_tokens: int = Field(512, ge=1, description="cap on a request's max_new_tokens (over it: 400)")
    max_n: int = Field(8, ge=1, description="cap on a /v1 request's n, choices per prompt (over it: 400)")
    max_logprobs: int = Field(20, ge=0, description="cap on logprobs / top_logprobs alternatives per token")
    context_limit: int | None = Field(None, ge=1, description="default: the model config's max positions")
    cuda_graphs: bool = Field(
        True, description="on a GPU, capture each decode bucket's step as a CUDA graph and replay it (off: eager)"
    )
    compile_decode: Literal["off", "inductor"] = Field(
        "off",
        description="torch.compile each decode bucket's step (rows, columns, routing mode) on first use, where no "
        "CUDA graph is captured (a CPU): same greedy tokens; each new bucket compiles once (seconds to a minute); "
        "see bench/step_profile.py for whether it pays on your model",
    )
    fuse_routing: bool = Field(
        True, description="on a GPU, torch.compile each layer's decode routing into a few fused kernels"
    )
    admin_token: str | None = Field(
        None,
        description="bearer token for the writing /experts endpoints; unset: direct loopback clients only (no "
        "forwarded headers, loopback bind address)",
    )
    api_keys: str | None = Field(
        None, description="comma-separated bearer keys that guard every endpoint but --open-paths; unset: open"
    )
    open_paths: str = Field(
        "/health,/ready",
        description="comma-separated paths that --api-keys leaves open (probes need /health and /ready; /ready "
        "shows a caller without a key its status only)",
    )
    max_body_bytes: int = Field(4 << 20, ge=1, description="largest request body, JSON endpoints (413 past it)")
    max_upload_bytes: int = Field(
        256 << 20, ge=1, description="largest POST /experts body or fetched source: an expert file (413 past it)"
    )
    max_prompt_chars: int = Field(
        200_000, ge=1, description="longest prompt (or chat messages together), checked before tokenizing (413)"
    )
    max_header_bytes: int = Field(16384, ge=1024, description="largest request headers in bytes (431 past it)")
    source_roots: str | None = Field(
        None,
        description="comma-separated directories a plug `source` may read files under (default: none, so local "
        "sources are refused; with the demo model, the shipped demo/experts and demo/compare)",
    )
    source_hosts: str | None = Field(
        None,
        description="comma-separated hosts (host or host:port) an http(s) plug `source` may fetch from, redirects "
        "included (default: none, so URL sources are refused)",
    )
    source_timeout_s: float = Field(30.0, gt=0, description="total deadline for fetching a plug `source`")
    graceful_shutdown_s: float = Field(
        5.0, ge=0, description="on SIGTERM, how long running requests may finish before they end with an error"
    )
    calibration_file: Path = Field(DEFAULT_CALIBRATION, description="general text for the admission report")
    admission: Literal["repair", "refuse", "off"] = Field(
        "repair",
        description="on plug: repair (raise a candidate's thresholds until it meets the limits), refuse (refuse "
        "it instead), off (plug without the report)",
    )
    # the admission limits: defaults and meaning are moe.admission.report.AdmissionLimits'
    max_false_positive_rate: float | None = _admission_limit("max_false_positive_rate")
    max_steal_rate: float | None = _admission_limit("max_steal_rate")
    max_base_ppl_increase: float | None = _admission_limit("max_base_ppl_increase")
    max_domain_ppl_increase: float | None = _admission_limit("max_domain_ppl_increase")
    max_accuracy_drop: float | None = _admission_limit("max_accuracy_drop")
    top_k: int = Field(1, ge=1, description="experts per token")
    router: Literal["gates", "context"] = Field(
        "context",
        description="what routes tokens and sequences: 'context' (the default: a classifier over base and every "
        "plugged expert on the sequence's running context, fitted after each plug from the experts' domain "
        "samples, docs/routing.md; admission measures the limits under it and repairs by raising the candidate's "
        "floors; a set in which an expert has fewer than 8 domain texts is routed by the gates) or 'gates' (each "
        "expert file's cosine gates alone, as before the context router)",
    )
    sequence_min_share: float = Field(
        0.25, gt=0, le=1, description="share of prompt decisions an expert needs to win a sequence-mode request"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 503 queue full")
    # --- vLLM-style LoRA adapters (server.api.routes.lora_adapters) ---
    lora_modules: list[str] | None = Field(
        None,
        description="PEFT LoRA adapters plugged at start, pin-only, as vLLM's flag takes them: name=path items, or "
        'JSON objects {"name", "path"} (env: a JSON list of those strings). Paths are the operator\'s: not '
        "limited to --source-roots",
    )
    log_level: str = Field("info", description="logging level")

    # --- connections (issue 24: server.connection_guard) ---
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a request's line and headers must arrive within this many seconds of the connection opening "
        "(or of the previous response on a kept-alive connection); past it, 408 and the connection is closed",
    )
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools",
        description="the HTTP/1.1 parser uvicorn runs (server.connection_guard): httptools (llhttp, in C) or h11 "
        "(pure Python, each streamed token framed in Python on the event loop)",
    )
    max_connections: int = Field(
        512,
        ge=1,
        le=1_000_000,
        description="open connections at most; past it a new connection gets 503 with Retry-After and is closed "
        "before it is read",
    )

    # --- expert-store hygiene (issue 24) ---
    store_gc_keep_versions: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="garbage-collect the expert store: after each replace or unplug this server commits (and on "
        "POST /experts/gc), delete the stored expert files that none of the newest K expert-set versions names "
        "(default: unset, files are deleted only by an unplug with purge)",
    )
    store_gc_grace_s: float = Field(
        300.0,
        ge=0,
        le=86_400 * 30,
        description="the garbage collector keeps a file written or reused by a plug less than this many seconds ago "
        "(another server's plug may be about to commit it)",
    )

    # --- request shares (issue 24: server.api.validation, server.engine, moe.decode.scheduler) ---
    max_stop_strings: int = Field(
        16, ge=0, le=1024, description="stop strings per request at most (over it: 400 stating the caps)"
    )
    max_stop_chars: int = Field(
        256,
        ge=1,
        le=100_000,
        description="characters in one stop string at most (the stop check holds back and searches this much text "
        "per token; over it: 400)",
    )
    max_stop_total_chars: int = Field(
        1024, ge=1, le=1_000_000, description="characters of a request's stop strings together at most (over it: 400)"
    )
    max_expert_rank: int = Field(
        256,
        ge=1,
        le=65_536,
        description="largest rank an expert file may declare (slot storage pads every plugged expert to the largest "
        "rank, so rank is memory for every expert; over it: 422)",
    )
    max_sequences_per_request: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="sequences one request may ask for (prompts x n) at most; over it: 400 stating the cap "
        "(default: half of --max-batch-size or --max-n, whichever is larger: the largest request leaves half the "
        "batch to other clients, and one prompt may always ask for --max-n choices; with the defaults, 8)",
    )
    max_sequences_per_client: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="sequences one client (its API key) may have in flight, waiting or running, at most; a request "
        "past it gets 429 with Retry-After (default under --api-keys: --max-sequences-per-request, so one client "
        "never holds more than its half of the batch and others start at once; without --api-keys, off unless set: "
        "a client is then its address, which every client behind one proxy or on one host shares)",
    )

    @field_validator("expert_store_options")
    @classmethod
    def _options_are_a_json_object(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"expert_store_options must be a JSON object: {e}") from e
            if not isinstance(parsed, dict):
                raise ValueError('expert_store_options must be a JSON object, like {"endpoint_url": "..."}')
        return value

    @property
    def serves_demo(self) -> bool:
        return _is_demo_model(self.model)

    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.serves_demo:
            return DEMO_MODEL_NAME
        return Path(self.model.rstrip("/")).name or self.model

    def resolved_experts_dir(self) -> Path:
        if self.experts_dir is not None:
            return self.experts_dir
        return user_data_dir() / self.served_model_name() / "experts"

    def resolved_expert_store(self) -> str | Path:
        """The expert store's URL or directory: --expert-store, else --experts-dir (or its default)."""
        return self.expert_store or self.resolved_experts_dir()

    def expert_store_storage_options(self) -> dict[str, Any]:
        return json.loads(self.expert_store_options) if self.expert_store_options else {}

    def resolved_seed_experts(self) -> Path | None:
        if self.seed_experts is not None:
            return self.seed_experts
        return DEMO_EXPERTS_DIR if self.serves_demo else None

    def sequences_per_request(self) -> int:
        """--max-sequences-per-request, or half the batch or --max-n, whichever is larger."""
        return self.max_sequences_per_request or max(1, self.max_batch_size // 2, self.max_n)

    def sequences_per_client(self) -> int | None:
        """--max-sequences-per-client; unset: what one request may ask for under --api-keys, else no per-client cap
        (an address is no client: a proxy, a NAT or one host's benchmark clients share it)."""
        if self.max_sequences_per_client is not None:
            return self.max_sequences_per_client
        return self.sequences_per_request() if self.api_key_set() else None

    def api_key_set(self) -> frozenset[str]:
        return item_set(self.api_keys)

    def open_path_set(self) -> frozenset[str]:
        return item_set(self.open_paths)

    def resolved_source_roots(self) -> tuple[Path, ...]:
        """Directories a local `source` may be read under, resolved (symlinks followed)."""
        if self.source_roots is None:
            return tuple(root.resolve() for root in DEMO_SOURCE_ROOTS) if self.serves_demo else ()
        return tuple(Path(root).expanduser().resolve() for root in _items(self.source_roots))

    def source_host_set(self) -> frozenset[str]:
        return frozenset(host.lower() for host in _items(self.source_hosts))

    @field_validator("lora_modules")
    @classmethod
    def _lora_modules_parse(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            parse_lora_module(item)
        return value

    def lora_module_list(self) -> list[tuple[str, str]]:
        """--lora-modules as (name, path) pairs, in the order given."""
        return [parse_lora_module(item) for item in self.lora_modules or ()]


def parse_lora_module(item: str) -> tuple[str, str]:
    """(name, path) from vLLM's --lora-modules item: `name=path`, or `{"name": ..., "path": ...}` (vLLM's JSON
    form; its base_model_name is accepted and not needed: one backbone is served)."""
    text = item.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"lora_modules item {text[:80]!r} is not valid JSON: {e}") from e
        if (
            not isinstance(parsed, dict)
            or not isinstance(parsed.get("name"), str)
            or not isinstance(parsed.get("path"), str)
        ):
            raise ValueError(f'lora_modules item {text[:80]!r} must be {{"name": "...", "path": "..."}}')
        return parsed["name"], parsed["path"]
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"lora_modules item {text[:80]!r} must be name=path (or a JSON object with name and path)")
    return name, path


def _items(value: str | None) -> list[str]:
    """A comma-separated setting as its non-empty items."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@functools.lru_cache(maxsize=32)
def item_set(value: str | None) -> frozenset[str]:
    """A comma-separated setting as a set of its items, parsed once per value (server.auth reads --api-keys and
    --open-paths on every request; keyed by the value, a changed setting is never served stale)."""
    return frozenset(_items(value))


class ClusterSettings(BaseSettings):
    """`plugmoe serve-cluster`'s own flags (server.cluster): the Ray Serve deployment around the app. The
    app itself takes the `plugmoe serve` flags (Settings) on every replica."""

    model_config = SettingsConfigDict(env_prefix="PLUGMOE_CLUSTER_", protected_namespaces=())

    ray_address: str | None = Field(
        None, description="the Ray cluster to join, e.g. auto or ray://head:10001 (default: start a local one)"
    )
    app_name: str = Field("plugmoe", description="Ray Serve application name")
    num_replicas: int = Field(2, ge=1, description="replicas (the minimum, with --max-replicas)")
    max_replicas: int | None = Field(
        None, ge=1, description="autoscale between --num-replicas and this many replicas (default: fixed count)"
    )
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling target: requests in flight per replica")
    num_cpus: float = Field(
        1, ge=0, description="CPUs reserved per replica, also its torch threads unless --num-threads (default: 1)"
    )
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (with --device cuda)")
    plug_wait_s: float = Field(
        30, ge=0, description="a plug waits this long for every live replica to serve it, then answers 202"
    )
    replica_host: str | None = Field(
        "127.0.0.1",
        description="each replica also serves its /metrics, /health and /ready (nothing else) on this host and a "
        "free port, listed by GET /cluster/sd for Prometheus; empty: off",
    )
    route_to_current: bool = Field(
        False,
        description="route requests only to replicas that serve the newest expert-set version (Ray Serve's "
        "custom request router, an alpha API)",
    )
    dashboard: bool = Field(False, description="start Ray's dashboard with a local Ray cluster")


@functools.lru_cache(maxsize=16)
def _is_demo_model(model: str) -> bool:
    """Whether `model` is the built-in demo model's directory. Cached: the routes ask per request (the served
    model's name), and resolving the path costs a filesystem walk on the event loop each time."""
    return Path(model).resolve() == DEMO_MODEL_DIR

"""Service settings: one pydantic-settings class; every field is a `plugmoe serve` flag and a PLUGMOE_* env var.

The built-in demo (folder demo/ beside the packages) is plain data here: its model and expert files are
located by path, never imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from moe.admission import DEFAULT_CALIBRATION

INSTALL_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = INSTALL_ROOT / "demo" / "model"
DEMO_EXPERTS_DIR = INSTALL_ROOT / "demo" / "experts"
DEMO_MODEL_NAME = "plugmoe-demo"


def user_data_dir() -> Path:
    """Where plugmoe keeps what it writes at run time: $XDG_DATA_HOME/plugmoe (~/.local/share/plugmoe)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "plugmoe"


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
    max_new_tokens: int = Field(512, ge=1, description="cap on a request's max_new_tokens")
    context_limit: int | None = Field(None, ge=1, description="default: the model config's max positions")
    admin_token: str | None = Field(
        None, description="bearer token for the writing /experts endpoints; unset: loopback clients only"
    )
    api_keys: str | None = Field(None, description="comma-separated bearer keys for generation; unset: open")
    calibration_file: Path = Field(DEFAULT_CALIBRATION, description="general text for the admission report")
    admission: Literal["repair", "refuse", "off"] = Field(
        "repair",
        description="on plug: repair (raise a candidate's thresholds until it meets the limits), refuse (refuse "
        "it instead), off (plug without the report)",
    )
    max_false_positive_rate: float | None = Field(
        1e-4,
        description="admission cap: per layer, the share of the calibration text's token-mode decisions a "
        "candidate may take; None or negative: off",
    )
    max_steal_rate: float | None = Field(
        2e-3,
        description="admission cap: per layer, the share of a plugged expert's domain-sample decisions a "
        "candidate may take (from the expert or from base); None or negative: off",
    )
    max_base_ppl_increase: float | None = Field(
        2e-4,
        description="admission limit: relative token-mode perplexity increase on the calibration text; None or "
        "negative: off",
    )
    max_domain_ppl_increase: float | None = Field(
        5e-3,
        description="admission limit: relative token-mode perplexity increase on each plugged expert's domain "
        "sample; None or negative: off",
    )
    top_k: int = Field(1, ge=1, description="experts per token")
    sequence_min_share: float = Field(
        0.25, gt=0, le=1, description="share of prompt decisions an expert needs to win a sequence-mode request"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 503 queue full")
    log_level: str = Field("info", description="logging level")

    @property
    def serves_demo(self) -> bool:
        return Path(self.model).resolve() == DEMO_MODEL_DIR

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

    def resolved_seed_experts(self) -> Path | None:
        if self.seed_experts is not None:
            return self.seed_experts
        return DEMO_EXPERTS_DIR if self.serves_demo else None

    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in (self.api_keys or "").split(",") if k.strip())

    @staticmethod
    def limit(value: float | None) -> float | None:
        """An admission limit, None when disabled (None or negative)."""
        return None if value is None or value < 0 else value

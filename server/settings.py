"""Service settings: one pydantic-settings class; every field is a `plugmoe serve` flag and a PLUGMOE_* env var."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_model_dir() -> Path:
    """The built-in demo backbone (folder demo/), or ./model when the demo package is absent."""
    try:
        from demo import MODEL_DIR
    except ImportError:
        return Path("model")
    return Path(MODEL_DIR)


def default_experts_dir() -> Path:
    try:
        from demo import EXPERTS_DIR
    except ImportError:
        return Path("experts")
    return Path(EXPERTS_DIR)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PLUGMOE_", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str = Field(
        default_factory=lambda: str(default_model_dir()), description="backbone: a local directory or a hub id"
    )
    model_name: str | None = Field(None, description="name in /v1/models (default: the model dir's name)")
    experts_dir: Path | None = Field(
        None, description="default: the demo experts dir with the demo model, else ./experts"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    max_batch_size: int = Field(16, ge=1)
    max_queue: int = Field(64, ge=0, description="waiting requests beyond the running batch; past it, 503")
    max_new_tokens: int = Field(512, ge=1, description="cap on a request's max_new_tokens")
    context_limit: int | None = Field(None, ge=1, description="default: the model config's max positions")
    admin_token: str | None = Field(
        None, description="bearer token for the writing /experts endpoints; unset: loopback clients only"
    )
    api_keys: str | None = Field(None, description="comma-separated bearer keys for generation; unset: open")
    calibration_file: Path | None = Field(
        None, description="general text for the admission report (default: the one shipped in experts/)"
    )
    max_false_positive_rate: float | None = Field(0.05, description="admission limit; None or negative: off")
    max_steal_rate: float | None = Field(0.5, description="admission limit; None or negative: off")
    top_k: int = Field(1, ge=1, description="experts per token")
    sequence_min_share: float = Field(0.25, gt=0, le=1)
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 503 queue full")
    log_level: str = "info"

    def resolved_experts_dir(self) -> Path:
        if self.experts_dir is not None:
            return self.experts_dir
        if Path(self.model).resolve() == default_model_dir().resolve():
            return default_experts_dir()
        return Path("experts")

    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in (self.api_keys or "").split(",") if k.strip())

    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if Path(self.model).resolve() == default_model_dir().resolve():
            return "plugmoe-demo"
        return Path(self.model.rstrip("/")).name or self.model

    @staticmethod
    def limit(value: float | None) -> float | None:
        """An admission limit, None when disabled (None or negative)."""
        return None if value is None or value < 0 else value

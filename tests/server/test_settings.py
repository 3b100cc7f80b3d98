"""Settings: the defaults (the demo, a store outside the source tree), PLUGMOE_* variables, and bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from moe.admission.report import AdmissionLimits
from server.admission_policy import AdmissionPolicy
from server.settings import Settings, user_data_dir


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PLUGMOE_MODEL", "PLUGMOE_EXPERTS_DIR", "PLUGMOE_PORT", "PLUGMOE_MAX_BATCH_SIZE"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings()
    assert (settings.host, settings.port, settings.device, settings.dtype) == ("127.0.0.1", 8000, "auto", "float32")
    assert settings.max_batch_size == 16 and settings.max_queue == 64
    from demo import EXPERTS_DIR, MODEL_DIR
    from server.settings import user_data_dir

    # the demo is served by default; plugged experts persist outside the source tree, seeded from the demo's
    assert Path(settings.model) == MODEL_DIR and settings.served_model_name() == "plugmoe-demo"
    assert settings.resolved_experts_dir() == user_data_dir() / "plugmoe-demo" / "experts"
    assert settings.resolved_seed_experts() == EXPERTS_DIR
    assert not settings.resolved_experts_dir().resolve().is_relative_to(MODEL_DIR.parents[1])
    elsewhere = Settings(model="/elsewhere/qwen")
    assert elsewhere.resolved_experts_dir() == user_data_dir() / "qwen" / "experts"
    assert elsewhere.resolved_seed_experts() is None
    assert Settings(api_keys=" a, b ,").api_key_set() == {"a", "b"}
    # the admission limits: AdmissionLimits' defaults (the README's table), None or negative turns one off
    limits = (settings.max_false_positive_rate, settings.max_steal_rate)
    assert (*limits, settings.max_base_ppl_increase, settings.max_domain_ppl_increase) == (1e-4, 2e-3, 2e-4, 5e-3)
    assert AdmissionPolicy(settings).limits == AdmissionLimits()
    limits = AdmissionLimits.from_flags(
        "repair", max_steal_rate=-1, max_false_positive_rate=None, max_domain_ppl_increase=0.1
    )
    assert (limits.max_steal_rate, limits.max_false_positive_rate, limits.max_domain_ppl_increase) == (None, None, 0.1)


def test_served_model_name() -> None:
    assert Settings(model="/models/my-llm/").served_model_name() == "my-llm"
    assert Settings(model="/m", model_name="custom").served_model_name() == "custom"
    assert Settings().served_model_name() == "plugmoe-demo"


def test_the_store_follows_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert user_data_dir() == tmp_path / "data" / "plugmoe"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert user_data_dir() == Path.home() / ".local" / "share" / "plugmoe"
    assert Settings(experts_dir=tmp_path / "mine").resolved_experts_dir() == tmp_path / "mine"
    assert Settings(seed_experts=tmp_path / "seed").resolved_seed_experts() == tmp_path / "seed"


def test_environment_variables_fill_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGMOE_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("PLUGMOE_DTYPE", "bfloat16")
    monkeypatch.setenv("PLUGMOE_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("PLUGMOE_MAX_STEAL_RATE", "-1")
    settings = Settings()
    assert (settings.max_batch_size, settings.dtype, settings.admin_token) == (3, "bfloat16", "s3cret")
    assert AdmissionPolicy(settings).limits.max_steal_rate is None
    assert Settings(max_batch_size=8).max_batch_size == 8, "given values win over the environment"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 70000),
        ("max_batch_size", 0),
        ("max_queue", -1),
        ("max_new_tokens", 0),
        ("context_limit", 0),
        ("num_threads", 0),
        ("top_k", 0),
        ("sequence_min_share", 0),
        ("sequence_min_share", 1.5),
        ("retry_after_s", -1),
        ("device", "tpu"),
        ("dtype", "float64"),
    ],
)
def test_out_of_range_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_expert_store_options_must_be_a_json_object() -> None:
    assert Settings(expert_store_options='{"endpoint_url": "http://x"}').expert_store_storage_options() == {
        "endpoint_url": "http://x"
    }
    with pytest.raises(ValueError, match="JSON object"):
        Settings(expert_store_options="[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Settings(expert_store_options="{endpoint")
    assert Settings(experts_dir=Path("/e")).resolved_expert_store() == Path("/e")
    assert Settings(experts_dir=Path("/e"), expert_store="s3://b/p").resolved_expert_store() == "s3://b/p"


def test_request_shares_default_to_half_the_batch_and_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 24: stop strings, sequences per request and per client, expert rank."""
    settings = Settings()
    assert (settings.max_stop_strings, settings.max_stop_chars, settings.max_stop_total_chars) == (16, 256, 1024)
    assert settings.max_expert_rank == 256
    assert settings.sequences_per_request() == 8  # half of 16
    assert settings.sequences_per_client() is None, "without --api-keys an address is no client: no per-client cap"
    keyed = Settings(api_keys="k1,k2")
    assert keyed.sequences_per_client() == 8, "under --api-keys a key holds at most what one request may ask for"
    assert Settings(max_batch_size=1, max_n=1).sequences_per_request() == 1
    assert Settings(max_n=20).sequences_per_request() == 20, "one prompt may always ask for --max-n choices"
    assert Settings(api_keys="k1", max_sequences_per_request=12).sequences_per_client() == 12
    assert Settings(max_sequences_per_client=5).sequences_per_client() == 5, "set: applies to addresses too"
    monkeypatch.setenv("PLUGMOE_MAX_SEQUENCES_PER_CLIENT", "3")
    monkeypatch.setenv("PLUGMOE_MAX_STOP_CHARS", "40")
    from_env = Settings()
    assert from_env.sequences_per_client() == 3 and from_env.max_stop_chars == 40
    for field, value in (
        ("max_stop_strings", -1),
        ("max_stop_chars", 0),
        ("max_stop_total_chars", 0),
        ("max_sequences_per_request", 0),
        ("max_sequences_per_client", 0),
        ("max_expert_rank", 0),
    ):
        with pytest.raises(ValidationError):
            Settings(**{field: value})

"""`plugmoe serve` flags mirror Settings; PLUGMOE_* env vars fill what flags leave out."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import cli
from server.settings import Settings


def test_every_setting_has_a_flag() -> None:
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in flags


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict = {}
    monkeypatch.setenv("PLUGMOE_PORT", "9001")
    monkeypatch.setenv("PLUGMOE_MAX_BATCH_SIZE", "3")
    monkeypatch.setattr(cli, "run_serve", lambda args: captured.update(vars(args)) or 0)
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--max-batch-size", "8", "--model", "/m", "--experts-dir", "/e"])
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    settings = Settings(**given)
    assert settings.port == 9001 and settings.max_batch_size == 8
    assert settings.model == "/m" and settings.experts_dir == Path("/e")


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
    assert Settings.limit(-1) is None and Settings.limit(None) is None and Settings.limit(0.1) == 0.1


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    from server.main import load_engine
    from server.metrics import Metrics

    with pytest.raises(FileNotFoundError, match="--model"):
        load_engine(Settings(model=str(tmp_path / "absent")), Metrics())


def test_experts_cli_subcommands_are_hooked_in() -> None:
    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert "serve" in commands
    try:
        from experts import cli as experts_cli
    except ImportError:
        return
    sub = __import__("argparse").ArgumentParser().add_subparsers()
    experts_cli.add_subcommands(sub)
    assert set(sub.choices) <= commands


def test_served_model_name() -> None:
    assert Settings(model="/models/my-llm/").served_model_name() == "my-llm"
    assert Settings(model="/m", model_name="custom").served_model_name() == "custom"
    assert Settings().served_model_name() == "plugmoe-demo"


def test_serve_cluster_has_every_setting_and_cluster_option() -> None:
    from server.settings import ClusterSettings

    parser = cli.build_parser()
    command = parser._subparsers._group_actions[0].choices["serve-cluster"]
    flags = {option for action in command._actions for option in action.option_strings}
    for name in (*Settings.model_fields, *ClusterSettings.model_fields):
        assert "--" + name.replace("_", "-") in flags
    argv = ["serve-cluster", "--num-replicas", "3", "--expert-store", "s3://b/p", "--route-to-current"]
    args = parser.parse_args(argv)
    assert args.num_replicas == 3 and args.expert_store == "s3://b/p" and args.route_to_current is True


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

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


def test_admission_limit_flags_share_one_definition() -> None:
    """`plugmoe serve`, `plugmoe admit` and `plugmoe train-expert` take the limits' defaults and help from
    moe.admission.report.AdmissionLimits (negative turns a limit off in both serve and admit)."""
    import dataclasses

    from experts.config import AdmitConfig, TrainConfig
    from moe.admission.report import LIMIT_HELP, LIMIT_NAMES, AdmissionLimits

    admit = {f.name: f for f in dataclasses.fields(AdmitConfig)}
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in LIMIT_NAMES:
        default = getattr(AdmissionLimits(), name)
        assert Settings.model_fields[name].default == admit[name].default == default, name
        assert (
            LIMIT_HELP[name] in Settings.model_fields[name].description
            and LIMIT_HELP[name] in admit[name].metadata["help"]
        )
        if name in train:
            assert train[name].default == default and LIMIT_HELP[name] in train[name].metadata["help"]
    assert AdmitConfig(max_steal_rate=-1).limits().max_steal_rate is None


def test_the_context_router_is_the_default_of_serve_eval_and_admit(monkeypatch: pytest.MonkeyPatch) -> None:
    """What serves is what eval measures and admission measures under: the context router, unless --router gates."""
    from experts.config import AdmitConfig, EvalConfig

    monkeypatch.delenv("PLUGMOE_ROUTER", raising=False)
    assert Settings().router == EvalConfig().router == AdmitConfig().router == "context"
    assert Settings(router="gates").router == EvalConfig(router="gates").router == "gates"
    with pytest.raises(ValueError, match="router must be"):
        AdmitConfig(router="cosine")


@pytest.mark.parametrize(
    ("flag", "expected"), [([], 2), (["--fair-share-ratio", "0"], 0), (["--fair-share-ratio", "3"], 3)]
)
def test_the_fair_share_flag_reaches_the_scheduler(flag: list[str], expected: int) -> None:
    """--fair-share-ratio sets the scheduler's share of a step's rows; unset, a CPU engine takes 2 (0: off)."""
    from server.main import load_engine
    from server.metrics import Metrics

    demo_model = str(Path(__file__).resolve().parents[2] / "demo" / "model")
    args = cli.build_parser().parse_args(["serve", "--model", demo_model, *flag])
    settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})
    engine = load_engine(settings, Metrics())
    assert engine.scheduler.share_ratio == expected

"""`plugmoe` command line: `serve`, `serve-cluster` (server.cluster), and the experts tooling's subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic_settings import BaseSettings

from server.settings import ClusterSettings, Settings

logger = logging.getLogger(__name__)


def _flag_type(annotation: object) -> tuple[type | None, tuple | None]:
    """(argparse type, choices) for a Settings field annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _flag_type(inner[0]) if len(inner) == 1 else (str, None)
    if typing.get_origin(annotation) is typing.Literal:
        return str, args
    if annotation is bool:
        return None, None
    return (annotation if annotation in (int, float, str, Path) else str), None


def add_settings_flags(parser: argparse.ArgumentParser, settings_class: type[BaseSettings]) -> None:
    """One flag per field of a settings class, with its env variable and default in the help."""
    prefix = settings_class.model_config.get("env_prefix", "")
    for name, field in settings_class.model_fields.items():
        kind, choices = _flag_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        env = f"{prefix}{name.upper()}"
        description = field.description or ""
        if "default" not in description:  # a description that explains its default says it better
            default = field.default if field.default_factory is None else field.default_factory()
            description += f" (default: {'unset' if default is None else default})"
        help_text = f"{description} (env {env})".strip()
        if kind is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            many = "+" if _is_list(field.annotation) else None  # e.g. --lora-modules a=/p b=/q, as vLLM takes it
            parser.add_argument(flag, type=kind, choices=choices, nargs=many, default=argparse.SUPPRESS, help=help_text)


def _is_list(annotation: object) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is list


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the model and its experts over HTTP",
        description="Every flag has a PLUGMOE_<FLAG> environment variable.",
    )
    add_settings_flags(serve, Settings)
    serve.set_defaults(func=run_serve)


def add_serve_cluster(subparsers: argparse._SubParsersAction) -> None:
    cluster = subparsers.add_parser(
        "serve-cluster",
        help="serve N replicas on Ray Serve, one expert set from a shared store (pip install 'plugmoe[cluster]')",
        description="The `plugmoe serve` flags (each replica's app; --host/--port: Ray Serve's proxy) plus the "
        "cluster's own (PLUGMOE_CLUSTER_<FLAG>). See docs/scale-out.md.",
    )
    add_settings_flags(cluster, Settings)
    add_settings_flags(cluster, ClusterSettings)
    cluster.set_defaults(func=run_serve_cluster)


def _settings(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    settings = Settings(**given)  # flags win over PLUGMOE_* env vars, which win over defaults
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.connection_guard import guarded_config
    from server.main import create_app

    settings = _settings(args)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        **guarded_config(settings),  # --http-parser's protocol, with the header deadline and size and a connection cap
        timeout_graceful_shutdown=max(1, int(settings.graceful_shutdown_s) + 5),  # a backstop after the drain
    )

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT, the engine drains first: running requests get --graceful-shutdown-s, then end
        with an error event, so their connections close and uvicorn's own graceful shutdown can finish."""

        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                engine.drain(settings.graceful_shutdown_s)
            super().handle_exit(sig, frame)

    DrainingServer(config).run()
    return 0


def run_serve_cluster(args: argparse.Namespace) -> int:
    settings = _settings(args)
    cluster = ClusterSettings(**{k: v for k, v in vars(args).items() if k in ClusterSettings.model_fields})
    try:
        from server import cluster as ray_cluster
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("ray"):
            raise
        logger.error("serve-cluster needs Ray Serve: pip install 'plugmoe[cluster]'")
        return 2
    ray_cluster.run(settings, cluster)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plugmoe", description="plug routed domain experts into a frozen LM")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve(subparsers)
    add_serve_cluster(subparsers)
    try:
        experts_cli = importlib.import_module("experts.cli")
    except ModuleNotFoundError as e:
        if e.name not in ("experts.cli", "experts"):
            raise
    else:
        if hasattr(experts_cli, "add_subcommands"):
            experts_cli.add_subcommands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)

"""The routed model and everything needed to serve it: a frozen backbone, experts and their file format, the
router with a base route, dispatch, the admission report, and the one generation path. Pure torch; no HTTP.

Layers above this package: `server/` (the HTTP service) and `experts/` (offline tooling) import from here
and never from each other.
"""

from moe.backbone import BackboneFingerprint, fingerprint, load_backbone
from moe.errors import (
    ExpertFileError,
    ExpertNameTakenError,
    GrammarError,
    IncompatibleExpertError,
    InvalidExpertNameError,
    RoutingSpecError,
    SamplingParamsError,
    UnknownExpertError,
    UnsupportedBackboneError,
)
from moe.expert import BASE_ROUTE, Expert, check_name
from moe.file import ExpertFile, write_atomically
from moe.plugged import PluggedSet
from moe.routed import RoutedModel, RoutedOutput
from moe.router import MODES, RouterConfig, RoutingMode, RoutingSpec, StepRouting
from moe.trace import RoutingTrace, route_shares, routing_entropy

__all__ = [
    "BASE_ROUTE",
    "MODES",
    "BackboneFingerprint",
    "Expert",
    "ExpertFile",
    "ExpertFileError",
    "ExpertNameTakenError",
    "GrammarError",
    "IncompatibleExpertError",
    "InvalidExpertNameError",
    "PluggedSet",
    "RoutedModel",
    "RoutedOutput",
    "RouterConfig",
    "RoutingMode",
    "RoutingSpec",
    "RoutingSpecError",
    "RoutingTrace",
    "SamplingParamsError",
    "StepRouting",
    "UnknownExpertError",
    "UnsupportedBackboneError",
    "check_name",
    "fingerprint",
    "load_backbone",
    "route_shares",
    "routing_entropy",
    "write_atomically",
]

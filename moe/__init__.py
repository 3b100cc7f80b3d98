"""The routed model and everything needed to serve it: a frozen backbone, experts (bottleneck and LoRA kinds)
and their file format, the router with a base route, dispatch, the admission report, and the one generation
path. Pure torch; no HTTP.

Layers above this package: `server/` (the HTTP service) and `experts/` (offline tooling) import from here
and never from each other.
"""

from moe.adapters.bottleneck import BottleneckAdapter
from moe.adapters.expert import BASE_ROUTE, Expert, check_name
from moe.adapters.file import ExpertFile, write_atomically
from moe.adapters.lora import LoraAdapter, LoraPair
from moe.adapters.slots import PluggedSet
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
from moe.model.backbone import BackboneFingerprint, fingerprint, load_backbone
from moe.model.routed import RoutedModel, RoutedOutput
from moe.model.trace import RoutingTrace, route_shares, routing_entropy
from moe.routing.router import MODES, RouterConfig, RoutingMode, RoutingSpec, StepRouting

__all__ = [
    "BASE_ROUTE",
    "MODES",
    "BackboneFingerprint",
    "BottleneckAdapter",
    "Expert",
    "ExpertFile",
    "ExpertFileError",
    "ExpertNameTakenError",
    "GrammarError",
    "IncompatibleExpertError",
    "InvalidExpertNameError",
    "LoraAdapter",
    "LoraPair",
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

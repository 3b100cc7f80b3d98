"""The routed model: experts on a frozen backbone, a router with a base route, balancing. Pure torch."""

from moe.backbone import BackboneFingerprint, UnsupportedBackboneError, fingerprint, load_backbone
from moe.expert import BASE_ROUTE, Expert, InvalidExpertNameError, check_name
from moe.plugged import ExpertNameTakenError, IncompatibleExpertError, PluggedSet, UnknownExpertError
from moe.routed import RoutedModel, RoutedOutput, RoutingTrace
from moe.router import RouterConfig, RoutingSpec, RoutingSpecError, StepRouting

__all__ = [
    "BASE_ROUTE",
    "BackboneFingerprint",
    "Expert",
    "ExpertNameTakenError",
    "IncompatibleExpertError",
    "InvalidExpertNameError",
    "PluggedSet",
    "RoutedModel",
    "RoutedOutput",
    "RouterConfig",
    "RoutingSpec",
    "RoutingSpecError",
    "RoutingTrace",
    "StepRouting",
    "UnknownExpertError",
    "UnsupportedBackboneError",
    "check_name",
    "fingerprint",
    "load_backbone",
]

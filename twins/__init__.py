"""Digital twins: device registry, twin models, reported/desired state and its sync.

Pure logic (no Bytewax, no connectors): ``dataflows.twins`` wires it into a flow.
"""

from iotflow.errors import TwinRejected
from twins.models import CommandSpec, PropertySpec, TwinModel, define_model, load_models
from twins.registry import Device, Registry, load_registry, simulator_registry

__all__ = [
    "CommandSpec",
    "Device",
    "PropertySpec",
    "Registry",
    "TwinModel",
    "TwinRejected",
    "define_model",
    "load_models",
    "load_registry",
    "simulator_registry",
]

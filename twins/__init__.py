"""Digital twins: device registry, twin models, reported/desired state and its sync.

Pure logic (no Bytewax, no connectors): ``dataflows.twins`` wires it into a flow.
``twins.history`` queries the DuckDB history; ``twins.simulation`` and
``twins.prediction`` run twins forward.
"""

from iotflow.errors import TwinRejected
from twins.models import CommandSpec, PropertySpec, TwinModel, define_model, load_models
from twins.policies import DesiredWins, LatestTimestamp, ReportedWins, SourcePriority, parse_policy
from twins.registry import Device, Registry, load_registry, simulator_registry
from twins.state import TwinChange, TwinState
from twins.sync import TwinOut, TwinSync
from twins.updates import DesiredChange, Reported, TwinRejection, UpdateDecoder, decode_desired

__all__ = [
    "CommandSpec",
    "DesiredChange",
    "DesiredWins",
    "Device",
    "LatestTimestamp",
    "PropertySpec",
    "Registry",
    "Reported",
    "ReportedWins",
    "SourcePriority",
    "TwinChange",
    "TwinModel",
    "TwinOut",
    "TwinRejected",
    "TwinRejection",
    "TwinState",
    "TwinSync",
    "UpdateDecoder",
    "decode_desired",
    "define_model",
    "load_models",
    "load_registry",
    "parse_policy",
    "simulator_registry",
]

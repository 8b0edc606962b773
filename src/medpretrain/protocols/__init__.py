"""Evaluation protocols, by name. Importing this package registers every built-in protocol."""

from medpretrain.protocols import finetune, fusion, knn, linear  # noqa: F401  (imported to register)
from medpretrain.protocols.base import (
    PROTOCOLS,
    EvalContext,
    Prediction,
    Protocol,
    get_protocol,
    protocol_cost,
    register_protocol,
)

__all__ = ["PROTOCOLS", "EvalContext", "Prediction", "Protocol", "get_protocol", "protocol_cost", "register_protocol"]

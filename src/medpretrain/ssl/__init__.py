"""Self-supervised pre-training methods, by name. Importing this package registers every built-in method."""

from medpretrain.ssl import (  # noqa: F401  (imported to register)
    barlow_twins,
    byol,
    dino,
    mae,
    moco,
    simclr,
    simsiam,
    spark,
    swav,
    vae,
    vicreg,
)
from medpretrain.ssl.base import METHODS, Method, MethodConfig, StepOutput, get_method, method_config, register_method

__all__ = ["METHODS", "Method", "MethodConfig", "StepOutput", "get_method", "method_config", "register_method"]

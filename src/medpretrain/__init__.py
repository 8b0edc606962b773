"""medpretrain: ImageNet transfer vs self-supervised pre-training for medical imaging."""

from medpretrain.errors import MedpretrainError

__version__ = "0.1.0"
__all__ = ["MedpretrainError", "__version__"]

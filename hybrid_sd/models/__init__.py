from .transformer import Transformer, SUPPORTED_MODEL_TYPES
from .loading import load_target

__all__ = ["Transformer", "SUPPORTED_MODEL_TYPES", "load_target"]

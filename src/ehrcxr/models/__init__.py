"""Models: one registry, one interface (``forward(batch) -> ModelOutput``)."""
from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.registry import create_model, get_model_class, list_models, register

__all__ = ["Batch", "ModelOutput", "create_model", "get_model_class", "list_models", "register"]

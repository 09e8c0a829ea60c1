"""Model registry: ``@register("name")`` on a class, ``create_model("name", ...)`` to build it."""
from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that makes a model available under ``name``."""

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice ({_MODELS[name].__name__}, {cls.__name__})")
        _MODELS[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def list_models() -> list[str]:
    """Names of all registered models."""
    _import_all()
    return sorted(_MODELS)


def get_model_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``; a clear error lists the known names."""
    _import_all()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the model registered under ``name`` with keyword arguments."""
    return get_model_class(name)(**kwargs)


def _import_all() -> None:
    """Import every module in ehrcxr.models so that their @register decorators run."""
    import importlib
    import pkgutil

    import ehrcxr.models as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in {"registry", "base"}:
            importlib.import_module(f"{package.__name__}.{module.name}")

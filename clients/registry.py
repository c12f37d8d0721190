"""Local update rules by method name (case-insensitive), filled by ``@register_rule``."""
from __future__ import annotations

from typing import Callable, Tuple, Type

from configs.registry import Registry


def _fill() -> None:
    from . import rules  # noqa: F401  (importing the package registers every rule)


_RULES = Registry("method for the client", case_insensitive=True, fill=_fill)


def register_rule(name: str) -> Callable[[Type], Type]:
    def decorator(cls: Type) -> Type:
        cls.name = name
        return _RULES.register(name)(cls)

    return decorator


def build_rule(name: str, cfg):
    """Instantiate the local rule of method ``name`` (e.g. ``'FedICRA'``)."""
    return _RULES.get(name)(cfg)


def rule_names() -> Tuple[str, ...]:
    return _RULES.names()

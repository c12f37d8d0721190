"""Name -> local update rule registry (filled by ``@register_rule``); names are case-insensitive."""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Type

_RULES: Dict[str, type] = {}


def register_rule(name: str) -> Callable[[Type], Type]:
    def decorator(cls: Type) -> Type:
        key = name.lower()
        if key in _RULES:
            raise ValueError(f"local rule {name!r} registered twice")
        cls.name = name
        _RULES[key] = cls
        return cls

    return decorator


def build_rule(name: str, cfg):
    """Instantiate the local rule of method ``name`` (e.g. ``'FedICRA'``)."""
    from . import rules  # noqa: F401  (fills the registry)

    try:
        return _RULES[name.lower()](cfg)
    except KeyError:
        raise ValueError(
            f"unknown method {name!r} for the client; expected one of {', '.join(rule_names())}"
        ) from None


def rule_names() -> Tuple[str, ...]:
    from . import rules  # noqa: F401

    return tuple(sorted(cls.name for cls in _RULES.values()))

"""Name -> server strategy registry (filled by ``@register_strategy``); names are case-insensitive."""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Type

_STRATEGIES: Dict[str, type] = {}


def register_strategy(name: str) -> Callable[[Type], Type]:
    def decorator(cls: Type) -> Type:
        key = name.lower()
        if key in _STRATEGIES:
            raise ValueError(f"strategy {name!r} registered twice")
        cls.name = name
        _STRATEGIES[key] = cls
        return cls

    return decorator


def strategy_class(name: str) -> type:
    from . import methods  # noqa: F401  (fills the registry)

    try:
        return _STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; expected one of {', '.join(strategy_names())}"
        ) from None


def strategy_names() -> Tuple[str, ...]:
    from . import methods  # noqa: F401

    return tuple(sorted(cls.name for cls in _STRATEGIES.values()))

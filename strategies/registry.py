"""Server strategies by method name (case-insensitive), filled by ``@register_strategy``."""
from __future__ import annotations

from typing import Callable, Tuple, Type

from configs.registry import Registry


def _fill() -> None:
    from . import methods  # noqa: F401  (importing it registers every strategy)


_STRATEGIES = Registry("strategy", case_insensitive=True, fill=_fill)


def register_strategy(name: str) -> Callable[[Type], Type]:
    def decorator(cls: Type) -> Type:
        cls.name = name
        return _STRATEGIES.register(name)(cls)

    return decorator


def strategy_class(name: str) -> type:
    return _STRATEGIES.get(name)


def strategy_names() -> Tuple[str, ...]:
    return _STRATEGIES.names()

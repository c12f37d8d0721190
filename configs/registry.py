"""Name tables that configuration values resolve against (networks, strategies, local rules).

Each table is filled by a decorator where the named thing is defined; a lookup of an unknown
name raises a ValueError that lists the valid ones.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, TypeVar

T = TypeVar("T")


class Registry:
    """Name -> object table.

    Parameters
    ----------
    kind : str
        What the table holds, for error messages ("network", "strategy", ...).
    case_insensitive : bool
        Whether ``'fedicra'`` finds ``'FedICRA'``.
    fill : callable, optional
        Called before every lookup, e.g. to import the modules whose decorators fill the table.
    """

    def __init__(self, kind: str, case_insensitive: bool = False,
                 fill: Optional[Callable[[], None]] = None) -> None:
        self.kind = kind
        self.case_insensitive = case_insensitive
        self._fill = fill
        self._entries: Dict[str, Tuple[str, object]] = {}

    def _key(self, name: str) -> str:
        return name.lower() if self.case_insensitive else name

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that stores its target under ``name``."""

        def decorator(obj: T) -> T:
            key = self._key(name)
            if key in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[key] = (name, obj)
            return obj

        return decorator

    def get(self, name: str):
        if self._fill is not None:
            self._fill()
        try:
            return self._entries[self._key(name)][1]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; expected one of {', '.join(self.names())}"
            ) from None

    def names(self) -> Tuple[str, ...]:
        if self._fill is not None:
            self._fill()
        return tuple(sorted(display for display, _ in self._entries.values()))

"""Local training alone: the site ignores every received array and shares nothing."""
from ..registry import register_rule
from .base import LocalRule


@register_rule("Local")
class LocalOnlyRule(LocalRule):
    def receive(self, trainer, arrays, shared, server_round: int) -> None:
        return None

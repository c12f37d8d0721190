"""Local training alone: nothing is shared; the server only schedules rounds and records."""
from .base import PersonalizedStrategy
from .registry import register_strategy


@register_strategy("Local")
class LocalOnly(PersonalizedStrategy):
    share_include = ()

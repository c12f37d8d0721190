"""Local training alone: nothing is shared; the server only schedules rounds and records."""
from clients.rules.base import LocalRule
from strategies.base import PersonalizedStrategy

from .registry import Method, register_method


class LocalServer(PersonalizedStrategy):
    share_include = ()


class LocalSite(LocalRule):
    def receive(self, trainer, arrays, shared, server_round: int) -> None:
        return None


LOCAL = register_method(Method(
    name="Local", server=LocalServer, site=LocalSite,
    summary="each site trains alone; nothing shared"))

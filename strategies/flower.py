"""The Flower names the server framework and the methods' server halves use, in one place.

A method module holds both halves of its method, so importing it imports the server
framework. A machine that only trains sites (the GPU benchmarks, which have torch but not
Flower) must still import every method for its site half: without Flower the names below are
placeholders that raise a clear error when a server half is actually used.
"""
from __future__ import annotations

try:
    from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType,
                          MetricRecord, RecordDict)
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result, Strategy
    HAVE_FLOWER = True
except ModuleNotFoundError as missing:  # pragma: no cover - exercised by test_method_registry
    if missing.name is None or missing.name.split(".")[0] != "flwr":
        raise
    HAVE_FLOWER = False

    class _NeedsFlower:
        """Stands in for a Flower class on a machine without Flower."""

        def __init__(self, *args, **kwargs) -> None:
            raise ModuleNotFoundError(
                f"{type(self).__name__}: the server half of a method needs Flower "
                "(pip install flwr); this machine can only train sites")

    def _placeholder(name: str) -> type:
        return type(name, (_NeedsFlower,), {})

    Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict, Grid, Result, \
        Strategy = (_placeholder(n) for n in ("Array", "ArrayRecord", "ConfigRecord", "Message",
                                              "MetricRecord", "RecordDict", "Grid", "Result",
                                              "Strategy"))

    class MessageType:  # the two constants the framework reads
        TRAIN = "train"
        EVALUATE = "evaluate"

__all__ = ["Array", "ArrayRecord", "ConfigRecord", "Message", "MessageType", "MetricRecord",
           "RecordDict", "Grid", "Result", "Strategy", "HAVE_FLOWER"]

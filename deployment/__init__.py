"""Deployment mode: a real SuperLink, one SuperNode per site and persistent site workers.

``run_deployment`` is imported lazily so that ``deployment.bridge`` (loaded by the SuperNode
for every message) does not pull in the launcher.
"""
from __future__ import annotations


def run_deployment(cfg, **options) -> int:
    """Run ``cfg`` on this machine in deployment mode; see :func:`deployment.launch.run_deployment`."""
    from .launch import run_deployment as _run

    return _run(cfg, **options)


__all__ = ["run_deployment"]

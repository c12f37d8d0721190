"""The objective's configuration uses the run configuration's names and defaults.

``losses`` imports no configuration (it runs alone on a GPU machine), so the fields of
:class:`losses.objective.ObjectiveConfig` match the keys of :class:`configs.RunConfig` by
convention only: this test fails when the two drift apart again.
"""
from __future__ import annotations

from dataclasses import MISSING, fields

from clients.steps import objective_config
from configs import RunConfig
from losses.objective import ObjectiveConfig


def test_every_objective_field_is_a_run_key_with_the_same_default():
    run = {f.name: f for f in fields(RunConfig)}
    for f in fields(ObjectiveConfig):
        assert f.name in run, f"ObjectiveConfig.{f.name} is no RunConfig key"
        if f.default is MISSING:  # procedure: always given by the run
            continue
        default = run[f.name].default
        assert type(f.default) is type(default) and f.default == default, (
            f"ObjectiveConfig.{f.name} = {f.default!r}, RunConfig.{f.name} = {default!r}")


def test_a_default_run_builds_the_default_objective():
    cfg = RunConfig()
    assert objective_config(cfg) == ObjectiveConfig(cfg.procedure)

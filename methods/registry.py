"""One registry of methods: each method module registers one :class:`Method` entry.

An entry holds everything the rest of the code needs to know about a method: its server half
(a :class:`strategies.base.PersonalizedStrategy` subclass), its site half (a
:class:`clients.rules.base.LocalRule` subclass), its hyper-parameter dataclass, its default
network and objective, and its capabilities. The name is resolved once, when the run
configuration is built (:class:`configs.schema.RunConfig` keeps the entry as ``cfg.method``).

The registry fills itself on first lookup by importing every module of the ``methods``
package, then every module named in the environment variable ``FEDICRA_METHODS``
(comma-separated import paths, e.g. ``mylab.fedfoo``: a method kept outside this repository;
deployment processes inherit the variable). It imports no method module statically, so a method
module may import anything of the project without forming an import cycle.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

#: Environment variable naming extra method modules to import.
EXTRA_MODULES_ENV = "FEDICRA_METHODS"
#: What a method deploys: one global model for every site, or each site's own model.
DEPLOYS = ("global", "personal")


@dataclass
class MethodParams:
    """Base of a method's hyper-parameters. Field names are configuration keys (TOML, ``--set``):
    they must not collide with the run-wide keys of :class:`configs.schema.RunConfig`, and a
    name that several methods use must mean the same there (same type)."""

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        """``(ok, message)`` pairs checked by :meth:`configs.schema.RunConfig.validate`; ``cfg``
        is the whole run configuration (for checks against ``rounds``, ``iters`` ...)."""
        return ()


@dataclass
class NoParams(MethodParams):
    """A method without hyper-parameters of its own."""


Refusal = Optional[Tuple[str, str]]


@dataclass(frozen=True)
class Method:
    """A compared method, as one registration declares it.

    Parameters
    ----------
    name : str
        The ``--strategy`` name (looked up case-insensitively).
    server : type or None
        The server strategy class; None for centralised training (``federated=False``).
    site : type or None
        The site's local rule class; None for centralised training.
    params : type
        The method's hyper-parameter dataclass (a :class:`MethodParams` subclass); its
        defaults are the method's paper values.
    model, procedure : str
        Default network and training objective (the paper's).
    defaults : mapping
        Values of run-wide keys the method sets by default (e.g. CT-full's ``label_form``).
    deploys : {"global", "personal"}
        What is tested: ``global/best.pt`` for every site, or each ``client<k>/best.pt``.
    federated : bool
        False: trained centrally by ``train`` on the pooled sites, without Flower.
    fine_tunes, calibrates : bool
        Whether the method fine-tunes after the rounds / trains a calibration head.
    extra_rounds : int
        Rounds the method runs after the configured ``rounds`` (fine-tuning, personalisation).
    refuses : callable, optional
        ``refuses(cfg) -> (key, reason)`` when the configuration cannot run the method.
    round_keys : tuple of str
        Keys of the round configuration the two halves exchange (for the docs and tests; the
        halves use the module's named constants).
    train : callable, optional
        ``train(cfg) -> exit code`` of a centralised method.
    network_options : callable, optional
        ``network_options(cfg) -> dict`` of constructor options the method sets on its
        network from its own keys (``networks.factory.build_for_run`` passes them).
    summary : str
        One line: what the method is (``--help``, docs).
    """

    name: str
    server: Optional[type]
    site: Optional[type]
    params: type = NoParams
    model: str = "unet"
    procedure: str = "pce"
    defaults: Mapping[str, object] = field(default_factory=dict)
    deploys: str = "personal"
    federated: bool = True
    fine_tunes: bool = False
    calibrates: bool = False
    extra_rounds: int = 0
    refuses: Optional[Callable[[object], Refusal]] = None
    round_keys: Tuple[str, ...] = ()
    train: Optional[Callable[[object], int]] = None
    network_options: Optional[Callable[[object], Mapping[str, object]]] = None
    summary: str = ""

    def __post_init__(self) -> None:
        if self.deploys not in DEPLOYS:
            raise ValueError(f"method {self.name}: deploys must be one of {DEPLOYS}, "
                             f"got {self.deploys!r}")
        if not (isinstance(self.params, type) and issubclass(self.params, MethodParams)
                and dataclasses.is_dataclass(self.params)):
            raise ValueError(f"method {self.name}: params must be a MethodParams dataclass")
        if self.federated and (self.server is None or self.site is None):
            raise ValueError(f"method {self.name}: a federated method needs a server and a site half")
        if not self.federated and self.train is None:
            raise ValueError(f"method {self.name}: a centralised method needs train(cfg)")

    def param_keys(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.params))

    def refusal(self, cfg) -> Refusal:
        """``(key, reason)`` when ``cfg`` cannot run this method, else None."""
        return self.refuses(cfg) if self.refuses is not None else None


_ENTRIES: Dict[str, Method] = {}


def register_method(entry: Method) -> Method:
    """Add ``entry`` to the registry (at import of its module); returns it."""
    key = entry.name.lower()
    old = _ENTRIES.get(key)
    if old is not None and old is not entry:
        if (old.server, old.site) != (entry.server, entry.site) or old.name != entry.name:
            raise ValueError(f"method {entry.name!r} registered twice")
    _ENTRIES[key] = entry
    return entry


def package_modules() -> List[str]:
    """The method modules of this package (every module but the registry)."""
    here = Path(__file__).resolve().parent
    return [f"methods.{m.name}" for m in pkgutil.iter_modules([str(here)])
            if m.name != "registry" and not m.name.startswith("_")]


def extra_modules() -> List[str]:
    """The modules named in ``$FEDICRA_METHODS``."""
    return [m.strip() for m in os.environ.get(EXTRA_MODULES_ENV, "").split(",") if m.strip()]


_imported: set = set()


def _discover() -> None:
    """Import the package's method modules (once) and any module ``$FEDICRA_METHODS`` names
    that is not imported yet (the variable is read at every lookup)."""
    wanted = [m for m in package_modules() + extra_modules() if m not in _imported]
    if not wanted:
        return
    for name in wanted:
        try:
            importlib.import_module(name)
        except ImportError as err:
            if name in extra_modules():
                raise ValueError(f"${EXTRA_MODULES_ENV}: cannot import method module "
                                 f"{name!r} ({err})") from err
            raise
        _imported.add(name)
    check_shared_keys(_ENTRIES.values())


def check_shared_keys(entries: Iterable[Method]) -> None:
    """A key several methods declare must have one type everywhere (one config file serves
    every method of a comparison)."""
    seen: Dict[str, Tuple[str, object]] = {}
    for entry in entries:
        for f in dataclasses.fields(entry.params):
            kind = type(getattr(entry.params(), f.name))
            if f.name in seen and seen[f.name][1] is not kind:
                raise ValueError(f"key {f.name!r} is a {seen[f.name][1].__name__} of method "
                                 f"{seen[f.name][0]} but a {kind.__name__} of {entry.name}")
            seen.setdefault(f.name, (entry.name, kind))


def get_method(name: str) -> Method:
    """The entry of method ``name`` (case-insensitive); ValueError listing the valid names."""
    _discover()
    try:
        return _ENTRIES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of "
                         f"{', '.join(method_names())}") from None


def method_names() -> Tuple[str, ...]:
    _discover()
    return tuple(sorted(e.name for e in _ENTRIES.values()))


def all_methods() -> Tuple[Method, ...]:
    _discover()
    return tuple(sorted(_ENTRIES.values(), key=lambda e: e.name.lower()))


def methods_with_key(key: str) -> Tuple[str, ...]:
    """Names of the methods that declare hyper-parameter ``key``."""
    return tuple(e.name for e in all_methods() if key in e.param_keys())


def all_param_keys() -> Dict[str, object]:
    """Every method key with its type's default value (for type checks of a key that the
    current method does not use)."""
    keys: Dict[str, object] = {}
    for entry in all_methods():
        defaults = entry.params()
        for f in dataclasses.fields(entry.params):
            keys.setdefault(f.name, getattr(defaults, f.name))
    return keys

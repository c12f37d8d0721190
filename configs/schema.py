"""Typed run configuration, loaded from TOML and overridden from the command line.

Every run writes its resolved configuration to ``<out_dir>/config.toml``; the test script and
the deployment workers read that snapshot, so a run is reproducible from the file alone.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from methods.registry import Method, MethodParams, all_param_keys, get_method, methods_with_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def config_dir() -> Path:
    """Folder holding the shipped TOML files (``faz.toml``, ``synthetic_faz.toml``, ...)."""
    return Path(__file__).resolve().parent


#: Keys that say only where and how a run executes on the launching machine: never sent to the
#: sites, and the keys a ``--resume`` may change.
LOCAL_ONLY_KEYS = ("gpus", "mode", "port", "cpus_per_client")
#: Keys a site sets for itself (``flower_runner.py site --root_path/--out_root``): with
#: :data:`LOCAL_ONLY_KEYS`, what may differ between the server's configuration and a site's.
SITE_PATH_KEYS = ("root_path", "out_root")

#: Keys that were renamed, with what replaces them (named in the error a stale file gets).
RENAMED_KEYS = {"ala_warmup_rounds": ("ala_warmup_iters", "rounds x iters, e.g. 5 rounds at iters = 10 -> 50")}


@dataclass
class RunConfig:
    """The settings every run shares, plus the method's own hyper-parameters (``params``).

    Field names double as TOML keys and flags. The configuration is flat on disk: the keys of
    ``params`` (the method's :class:`methods.registry.MethodParams` dataclass, e.g. FedProx's
    ``prox_mu``) sit beside the run-wide ones, see :meth:`to_dict` / :meth:`from_mapping`.
    ``cfg.method`` is the method's registry entry, resolved once from ``strategy``.
    """

    # data
    img_class: str = "faz"
    root_path: str = "data/faz_h5"
    img_size: int = 0  # 0: the task's default size
    val_fraction: float = 0.2
    label_form: str = ""  # "": each site's own weak form; "mask": full masks (CT-full style)
    # experiment
    exp: str = "{img_class}/{strategy}"  # placeholders: {img_class}, {strategy}
    out_root: str = "model"
    seed: int = 2022
    # model and objective
    model: str = "unet_lc_multihead"
    base_channels: int = 16
    aux_channels: int = 512
    procedure: str = "pce_gatedcrf_mstree"
    alpha: float = 1.0
    lambda_tree: float = 0.1
    lambda_crf: float = 0.1
    crf_sigma_xy: float = 6.0
    crf_sigma_rgb: float = 0.1
    crf_radius: int = 5
    crf_downsample: int = 1
    tree_sigma_low: float = 0.02
    tree_sigma_high: float = 1.0
    # reference fidelity (docs/federated.md, "differences from the reference")
    tree_gray_as_rgb: bool = True  # 1-channel images build the image tree as if repeated to RGB
    sc_grad: bool = False  # the site-contrastive term is computed without gradient, as the reference (docs/results.md: the ablation)
    rotate_order: int = 0  # image interpolation of the free rotation (0: nearest, the reference)
    rotate_fill: float = -1.0  # image fill of the free rotation (< 0: the task's reference fill)
    reset_optimizer: bool = True  # fresh AdamW state every round (the reference); False: one per run
    # federation
    strategy: str = "FedICRA"
    num_clients: int = 5
    rounds: int = 3000
    iters: int = 10
    batch_size: int = 12
    base_lr: float = 0.01
    weight_decay: float = 0.01
    # lost sites and deadlines (docs/deployment.md, "Timeouts, lost sites and rejoining")
    min_fit_clients: int = 0  # clients that must answer for a round to count (0: all but one, at least 1); fewer: the run stops, exit code 1
    round_timeout: float = 0.0  # seconds the server waits for a round's replies, then goes on without the late sites (0: automatic, 10 x the median round, at least 120 s, 3600 s until a round completed)
    # validation, logging
    eval_every: int = 1
    tb_images_every: int = 0  # TensorBoard predictions: 0 at every validation round; N: validation rounds divisible by N (and the last)
    # processes
    mode: str = "deployment"
    port: int = 8097
    gpus: List[int] = field(default_factory=list)
    cpus_per_client: float = 0.0  # CPU threads per site; 0: the machine's cores shared out (site_threads)
    # speed (docs/benchmarks.md, "Training step"): neither key changes which batches are drawn
    amp: bool = False  # bf16 autocast of the network's forward pass; the losses stay float32
    prefetch: int = 2  # batches built ahead on background threads (0: on the training thread)
    # the method's hyper-parameters (None: its defaults)
    params: Optional[MethodParams] = None

    def __post_init__(self) -> None:
        entry = get_method(self.strategy)
        self.strategy = entry.name
        if self.params is None:
            self.params = entry.params()
        elif type(self.params) is not entry.params:
            raise ValueError(f"invalid configuration: params of {type(self.params).__name__} "
                             f"given to method {entry.name} (expects {entry.params.__name__})")
        self._method = entry
        #: keys of other methods that the mapping it was built from set (ignored here)
        self.ignored_keys: Dict[str, Any] = {}

    @property
    def method(self) -> Method:
        """The registry entry of ``strategy`` (its server and site halves, capabilities)."""
        return self._method

    def site_threads(self, sites_here: Optional[int] = None) -> int:
        """CPU threads of one site: ``cpus_per_client``, or with 0 the cores of this machine
        shared by the sites it runs (``sites_here``, default ``num_clients``), at least 1."""
        if self.cpus_per_client > 0:
            return max(1, int(self.cpus_per_client))
        return max(1, (os.cpu_count() or 1) // max(1, sites_here or self.num_clients))

    @property
    def min_fit(self) -> int:
        """Clients that must answer for a round to count: ``min_fit_clients``, or with 0 all
        but one (at least 1)."""
        return self.min_fit_clients or max(1, self.num_clients - 1)

    @property
    def exp_name(self) -> str:
        """``exp`` with its ``{img_class}`` / ``{strategy}`` placeholders filled in."""
        try:
            return self.exp.format(img_class=self.img_class, strategy=self.strategy)
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"invalid configuration: exp {self.exp!r} may only use the "
                             "placeholders {img_class} and {strategy}") from None

    @property
    def out_dir(self) -> Path:
        return Path(self.out_root) / self.exp_name

    def validate(self) -> "RunConfig":
        not_finite = [f"{k} = {v!r}" for k, v in {**self.ignored_keys, **self.to_dict()}.items()
                      if isinstance(v, float) and not math.isfinite(v)]
        if not_finite:
            raise ValueError(f"invalid configuration: {', '.join(not_finite)}: every number "
                             "must be finite (no nan or inf)")
        checks = [
            (self.base_lr > 0.0, f"base_lr = {self.base_lr!r} must be > 0 (the initial "
                                 "learning rate, e.g. 0.01)"),
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.iters >= 1, "iters must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.num_clients >= 1, "num_clients must be >= 1"),
            (0 <= self.min_fit_clients <= self.num_clients,
             f"min_fit_clients = {self.min_fit_clients} must lie in [0, num_clients = "
             f"{self.num_clients}] (0: all but one)"),
            (self.round_timeout >= 0.0, "round_timeout must be >= 0 (0: automatic)"),
            (0.0 < self.val_fraction < 1.0, "val_fraction must lie in (0, 1)"),
            (self.mode in ("simulation", "deployment"), "mode must be simulation or deployment"),
            (self.img_size == 0 or self.img_size % 16 == 0, "img_size must be 0 or a multiple of 16"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.rotate_order in (0, 1, 3), "rotate_order must be 0, 1 or 3"),
            (self.cpus_per_client >= 0, "cpus_per_client must be >= 0 (0: share the cores)"),
            (self.prefetch >= 0, f"prefetch = {self.prefetch} must be >= 0 (0: no background threads)"),
        ]
        checks += list(self.params.checks(self))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid configuration: {message}")
        return self

    def get(self, key: str) -> Any:
        """The value of flat key ``key`` (run-wide or the method's; a key of another method
        that was given is returned as given). KeyError for a key nobody declares."""
        if key in self.shared_keys():
            return getattr(self, key)
        if key in {f.name for f in fields(self.params)}:
            return getattr(self.params, key)
        return self.ignored_keys[key]

    @classmethod
    def shared_keys(cls) -> List[str]:
        """The run-wide keys (every field but ``params``)."""
        return [f.name for f in fields(cls) if f.name != "params"]

    def to_dict(self) -> Dict[str, Any]:
        """The flat configuration: run-wide keys, then the method's keys."""
        every = dataclasses.asdict(self)
        values = {k: every[k] for k in self.shared_keys()}
        values.update(dataclasses.asdict(self.params))
        return values

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "mapping") -> "RunConfig":
        """Build from flat keys: run-wide ones, those of the method named by ``strategy``, and
        keys of other methods, which are type-checked, then ignored (one file serves every
        method of a comparison) and listed in :attr:`ignored_keys`."""
        shared = {f.name: f for f in fields(cls) if f.name != "params"}
        try:
            entry = get_method(str(values.get("strategy", cls.strategy)))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        own = entry.params()
        own_keys = set(entry.param_keys())
        others = {k: v for k, v in all_param_keys().items() if k not in own_keys}
        unknown = sorted(set(values) - set(shared) - own_keys - set(others))
        renamed = [f"{old} (now {new}: {how})" for old, (new, how) in RENAMED_KEYS.items()
                   if old in unknown]
        if renamed:
            raise ValueError(f"{source}: renamed configuration key(s) {'; '.join(renamed)}")
        if unknown:
            raise ValueError(
                f"{source}: unknown configuration key(s) {', '.join(unknown)}; expected some "
                f"of {', '.join(sorted(shared))} or the keys of a method "
                f"({entry.name}'s: {', '.join(sorted(own_keys)) or 'none'})")
        base = cls(strategy=entry.name)
        run_values: Dict[str, Any] = {}
        for key, value in values.items():
            if key == "params":
                continue
            if key in shared:
                run_values[key] = _coerce(key, value, getattr(base, key), source)
            elif key in own_keys:
                setattr(own, key, _coerce(key, value, getattr(own, key), source))
        ignored = {k: _coerce(k, v, others[k], source) for k, v in values.items() if k in others}
        run_values["strategy"] = entry.name
        cfg = cls(**run_values, params=own)
        cfg.ignored_keys = ignored
        return cfg

    @classmethod
    def build(cls, **values: Any) -> "RunConfig":
        """``from_mapping(values)``: a configuration from keyword arguments, method keys included."""
        return cls.from_mapping(values, "arguments")

    def override(self, values: Mapping[str, Any], source: str = "overrides") -> "RunConfig":
        merged = {**self.ignored_keys, **self.to_dict()}
        merged.update({k: v for k, v in values.items() if v is not None})
        return RunConfig.from_mapping(merged, source)


def describe_ignored(cfg: RunConfig) -> str:
    """One line naming the keys of other methods that ``cfg``'s method does not use ("" if none)."""
    if not cfg.ignored_keys:
        return ""
    parts = [f"{k} ({', '.join(methods_with_key(k))})" for k in sorted(cfg.ignored_keys)]
    return f"keys of other methods, not used by {cfg.strategy}: {'; '.join(parts)}"


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, list) and isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    raise ValueError(
        f"{source}: key {key!r} expects {type(default).__name__}, got {value!r}"
    )


def read_config_values(path: os.PathLike) -> Dict[str, Any]:
    """The keys a TOML file sets, checked against :class:`RunConfig` (names and types)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    RunConfig.from_mapping(values, str(path))
    return values


def load_config(path: os.PathLike) -> RunConfig:
    """Read a TOML file (flat keys of :class:`RunConfig`; unset keys keep their defaults)."""
    return RunConfig.from_mapping(read_config_values(path), str(path))


def save_config(cfg: RunConfig, path: os.PathLike) -> None:
    """Write the configuration snapshot atomically."""
    import tomli_w  # only writing needs it: readers (test script, GPU benchmarks) run without

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            tomli_w.dump(cfg.to_dict(), f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

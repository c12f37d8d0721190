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

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def config_dir() -> Path:
    """Folder holding the shipped TOML files (``faz.toml``, ``synthetic_faz.toml``, ...)."""
    return Path(__file__).resolve().parent


#: Keys that were renamed, with what replaces them (named in the error a stale file gets).
RENAMED_KEYS = {"ala_warmup_rounds": ("ala_warmup_iters", "rounds x iters, e.g. 5 rounds at iters = 10 -> 50")}


@dataclass
class RunConfig:
    """All settings of one federated run. Field names double as TOML keys and CLI flags."""

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
    rep_iters: int = 0  # FedICRA, FedRep: of the iters, the last rep_iters train the body (their default 3)
    batch_size: int = 12
    base_lr: float = 0.01
    weight_decay: float = 0.01
    # lost sites and deadlines (docs/deployment.md, "Timeouts, lost sites and rejoining")
    min_fit_clients: int = 0  # clients that must answer for a round to count (0: all but one, at least 1); fewer: the run stops, exit code 1
    round_timeout: float = 0.0  # seconds the server waits for a round's replies, then goes on without the late sites (0: automatic, 10 x the median round, at least 120 s, 3600 s until a round completed)
    # adaptive local aggregation (FedICRA, FedALA)
    ala_eta: float = 1.0
    ala_threshold: float = 0.1
    ala_num_pre_loss: int = 10
    ala_rand_percent: float = 0.8
    ala_warmup_iters: int = 0  # local iterations (round x iters) during which the site takes the whole global model (FedICRA and the reference: 50)
    ala_max_epochs: int = 20  # 0: no cap (FedALA and the reference loop until the rule stops)
    ala_w_init: float = 1.0  # initial W: 1 starts from the global model (FedALA), 0 from the local one (the reference)
    ala_groups: str = "decoder,out_conv,aux"  # blended groups when ala_layer_idx = 0 (reference: decoder,out_conv)
    ala_global_buffers: bool = False  # blended layers' BatchNorm statistics from the global model (reference: true)
    ala_layer_idx: int = 0  # 0: blend the decoder side (FedICRA); N > 0: the top N parameter tensors (FedALA)
    # the reference FedICRA code's round (FedICRA-ref; docs/federated.md, "FedICRA-ref")
    ala_reset_weights: bool = False  # W restarts at ala_w_init at every blend (the reference); False: W kept across rounds
    ala_reset_every_iters: int = 0  # after a round that reaches a multiple of this many local iterations, the next starts from the whole global model (reference: 20); 0: never
    ala_validate_blend: bool = False  # validation and best.pt score the site model blended with the round's aggregate, before training (the reference); False: the trained model
    # FedProx
    prox_mu: float = 0.01
    # FT: FedAvg, then each site fine-tunes the final global model (strategies/ft.py)
    ft_iters: int = 0  # fine-tuning iterations per site after the last round (0: none; FT's default 200)
    ft_lr: float = 0.0  # initial lr of the fine-tuning's own poly decay (0: base_lr; FT's default 0.001)
    # MetaFed: cyclic knowledge distillation around a ring of sites (strategies/metafed.py)
    metafed_lambda: float = 1.0  # weight of the feature-distillation MSE (the original's --lam default)
    metafed_threshold: float = 0.6  # validation Dice above which a site distils from its teacher instead of copying it (1: always copy)
    metafed_teacher_threshold: float = 0.5  # personalisation: a teacher no better than the site and below this Dice teaches with weight 0
    # FedAP: FedAvg pre-training, then BN local and per-client weights from BN statistics (strategies/fedap.py)
    fedap_pretrain_rounds: int = 0  # FedAvg rounds before the BN statistics (0: a tenth of rounds, at least 1, at most rounds - 2)
    fedap_lambda: float = 0.5  # weight of the own model in each client's aggregate (the original's model_momentum)
    # FedLC: personal head + calibration, site-contrastive PCS (strategies/fedlc.py; docs/federated.md, "FedLC")
    fedlc_head_fraction: float = 0.2  # share of a round's iters that train the head first, the rest the body (the original: head_iter 10 of its 50 batches a round)
    # CT-weak / CT-full: centralised training on the pooled sites (strategies/centralised.py)
    ct_batch: str = "federation"  # cases a step: "federation" = num_clients x batch_size (what the sites train on together), "site" = batch_size (the reference's Unet_pCE.py)
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

    def site_threads(self, sites_here: Optional[int] = None) -> int:
        """CPU threads of one site: ``cpus_per_client``, or with 0 the cores of this machine
        shared by the sites it runs (``sites_here``, default ``num_clients``), at least 1."""
        if self.cpus_per_client > 0:
            return max(1, int(self.cpus_per_client))
        return max(1, (os.cpu_count() or 1) // max(1, sites_here or self.num_clients))

    @property
    def fedap_pretrain(self) -> int:
        """FedAP's rounds of FedAvg pre-training: ``fedap_pretrain_rounds``, or with 0 a tenth
        of ``rounds``, at least 1 but at most ``rounds - 2`` (so that the statistics round and
        one personalised round remain: a 2-round smoke run measures the initial model)."""
        if self.fedap_pretrain_rounds:
            return self.fedap_pretrain_rounds
        return max(0, min(max(1, self.rounds // 10), self.rounds - 2))

    @property
    def fedlc_head_steps(self) -> int:
        """FedLC: the first steps of a round, which train the head (the rest train the body):
        ``fedlc_head_fraction * iters`` rounded half up, but at least 1 and at most
        ``iters - 1`` when ``0 < fedlc_head_fraction < 1`` and ``iters >= 2`` (both parts
        train). The default 0.2 is the original's ``head_iter = 10`` of its 50 steps a round."""
        fraction, iters = self.fedlc_head_fraction, self.iters
        steps = int(math.floor(fraction * iters + 0.5))
        if 0.0 < fraction < 1.0 and iters >= 2:
            steps = min(iters - 1, max(1, steps))
        return max(0, min(iters, steps))

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
        not_finite = [f"{f.name} = {getattr(self, f.name)!r}" for f in fields(self)
                      if isinstance(getattr(self, f.name), float)
                      and not math.isfinite(getattr(self, f.name))]
        if not_finite:
            raise ValueError(f"invalid configuration: {', '.join(not_finite)}: every number "
                             "must be finite (no nan or inf)")
        checks = [
            (self.base_lr > 0.0, f"base_lr = {self.base_lr!r} must be > 0 (the initial "
                                 "learning rate, e.g. 0.01)"),
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.iters >= 1, "iters must be >= 1"),
            (0 <= self.rep_iters <= self.iters,
             f"rep_iters = {self.rep_iters} must lie in [0, iters = {self.iters}]"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.num_clients >= 1, "num_clients must be >= 1"),
            (0 <= self.min_fit_clients <= self.num_clients,
             f"min_fit_clients = {self.min_fit_clients} must lie in [0, num_clients = "
             f"{self.num_clients}] (0: all but one)"),
            (self.round_timeout >= 0.0, "round_timeout must be >= 0 (0: automatic)"),
            (0.0 < self.val_fraction < 1.0, "val_fraction must lie in (0, 1)"),
            (0.0 < self.ala_rand_percent <= 1.0, "ala_rand_percent must lie in (0, 1]"),
            (self.mode in ("simulation", "deployment"), "mode must be simulation or deployment"),
            (self.img_size == 0 or self.img_size % 16 == 0, "img_size must be 0 or a multiple of 16"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.rotate_order in (0, 1, 3), "rotate_order must be 0, 1 or 3"),
            (self.ala_layer_idx >= 0, "ala_layer_idx must be >= 0"),
            (0.0 <= self.ala_w_init <= 1.0, "ala_w_init must lie in [0, 1]"),
            (self.ala_max_epochs >= 0, "ala_max_epochs must be >= 0"),
            (self.ala_warmup_iters >= 0, "ala_warmup_iters must be >= 0 (0: only the first round)"),
            (self.ala_reset_every_iters >= 0, "ala_reset_every_iters must be >= 0 (0: never)"),
            (self.ft_iters >= 0, "ft_iters must be >= 0"),
            (self.ft_lr >= 0.0, f"ft_lr = {self.ft_lr!r} must be >= 0 (0: base_lr)"),
            (self.metafed_lambda >= 0.0, "metafed_lambda must be >= 0"),
            (0.0 <= self.metafed_threshold <= 1.0,
             "metafed_threshold must lie in [0, 1] (a validation Dice; 1: never distil, always copy)"),
            (0.0 <= self.metafed_teacher_threshold <= 1.0,
             "metafed_teacher_threshold must lie in [0, 1] (a validation Dice)"),
            (self.fedap_pretrain_rounds >= 0, "fedap_pretrain_rounds must be >= 0 (0: a tenth of rounds)"),
            (0.0 <= self.fedap_lambda <= 1.0, "fedap_lambda must lie in [0, 1]"),
            (0.0 <= self.fedlc_head_fraction <= 1.0,
             f"fedlc_head_fraction = {self.fedlc_head_fraction} must lie in [0, 1] (the share of "
             "a FedLC round's iters that train the head before the body; the original: 0.2)"),
            (self.ct_batch in ("federation", "site"),
             f"ct_batch = {self.ct_batch!r} must be \"federation\" (num_clients x batch_size "
             "pooled cases a CT step: the samples a federated step trains on at all sites) or "
             "\"site\" (batch_size cases a step, one site's share, as the reference's Unet_pCE.py)"),
            (self.cpus_per_client >= 0, "cpus_per_client must be >= 0 (0: share the cores)"),
            (self.prefetch >= 0, f"prefetch = {self.prefetch} must be >= 0 (0: no background threads)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid configuration: {message}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat_record(self) -> Dict[str, Any]:
        """Values as Flower ConfigRecord accepts them (lists of ints stay lists)."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.to_dict().items()}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "mapping") -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        renamed = [f"{old} (now {new}: {how})" for old, (new, how) in RENAMED_KEYS.items()
                   if old in unknown]
        if renamed:
            raise ValueError(f"{source}: renamed configuration key(s) {'; '.join(renamed)}")
        if unknown:
            raise ValueError(
                f"{source}: unknown configuration key(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(known))}"
            )
        cfg = cls()
        for key, value in values.items():
            setattr(cfg, key, _coerce(key, value, getattr(cfg, key), source))
        return cfg

    def override(self, values: Mapping[str, Any], source: str = "overrides") -> "RunConfig":
        merged = self.to_dict()
        merged.update({k: v for k, v in values.items() if v is not None})
        return RunConfig.from_mapping(merged, source)


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

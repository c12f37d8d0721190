"""FedLPPA (Lin et al., "Learning Personalized Prompt and Aggregation for Federated
Weakly-supervised Medical Image Segmentation", IEEE TMI 2024), as the authors' published FedLPPA
run computes it (llmir/FedLPPA: ``--strategy FedUniV2.1`` with ``--model unet_univ5``), with the
reference's defects fixed by default (docs/federated.md, "FedLPPA").

Network: :mod:`networks.lppa` (prompts, tri-prompt dual-attention fusion, a task decoder with a
prototype gate, an auxiliary decoder).

Site, each round:

1. receive: everything from the aggregate, the auxiliary decoder as this site's own prompt-
   similarity aggregate; after ``ala_warmup_iters`` local iterations the task decoder
   (``decoder``, ``out_conv``) is blended with the site's own by adaptive local aggregation
   (:class:`clients.rules.ala.ALARule`, the reference's "LA");
2. ``iters`` steps of ``pCE + lppa_alpha * L_prompt + lppa_beta * L_pseudo`` on every
   parameter (:mod:`losses.lppa`): the own prompt's fused map diverges from the other sites';
   both decoders learn the pseudo-label of a random mixture of their predictions.

Server: the sample-weighted mean of every array, except that each site's distribution prompt
comes from that site alone (``lppa_prompt_owner``); then, per site i, the auxiliary decoder
``sum_k c_ik theta_aux,k / sum_k c_ik`` with ``c_ik = max(0, cos(P_i, P_k))``, ``P_k`` the
aggregate's prompt pair (distribution prompt k, universal prompt) (``lppa_dual_init =
aggregated``; ``nearest``, ``adjacent`` and ``random`` pick one site's decoder instead).
Only site i receives its auxiliary decoder.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from clients.rules.ala import ALAParams, ALARule
from clients.trainer import float32_output
from losses.lppa import DIVERGENCE_FORMS, prompt_divergence_loss, pseudo_label_dice_loss
from networks.checkpoint import as_arrays, as_tensors
from networks.lppa import ATTENTIONS
from networks.registry import network_info
from strategies.base import to_numpy, to_record
from strategies.flower import ArrayRecord

from .fedala import ALAServer
from .registry import Method, register_method

log = logging.getLogger("fedicra.server")

DISTRIBUTION_KEY = "prompts.distribution"
UNIVERSAL_KEY = "prompts.universal"
AUX_PREFIX = "aux_decoder."
DUAL_INITS = ("aggregated", "nearest", "adjacent", "random")


@dataclass
class FedLPPAParams(ALAParams):
    """FedLPPA's keys; defaults are the published command's (``--alpha 0.1 --beta 0.5
    --prompt universal --attention dual --dual_init aggregated --label_prompt 1``) and the
    reference's adaptive aggregation (after 50 local iterations, of the task decoder)."""

    lppa_alpha: float = 0.1  # weight of the prompt divergence term
    lppa_beta: float = 0.5  # weight of the dual-decoder pseudo-label term
    lppa_prompt: str = "universal"  # learnt prompts (the reference's one-hot ablation is not offered)
    lppa_attention: str = "dual"  # fusion attention: dual (spatial + channel), sab, cab
    lppa_dual_init: str = "aggregated"  # auxiliary decoder per site: aggregated, nearest, adjacent, random
    lppa_label_prompt: bool = True  # feed the annotation sparsity prompt
    lppa_divergence: str = "softmax_kl"  # prompt term: softmax_kl (ours) or reference (KLDivLoss on raw maps)
    lppa_prompt_owner: bool = True  # each site's distribution prompt comes from that site alone (reference: averaged)
    ala_warmup_iters: int = 50  # the reference's iter_global <= 50
    ala_groups: str = "decoder,out_conv"  # the task decoder (the reference's up1-4, mlp, out_conv)

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [*super().checks(cfg),
                (self.lppa_alpha >= 0.0, "lppa_alpha must be >= 0"),
                (self.lppa_beta >= 0.0, "lppa_beta must be >= 0"),
                (self.lppa_attention in ATTENTIONS,
                 f"lppa_attention = {self.lppa_attention!r}: expected one of {', '.join(ATTENTIONS)}"),
                (self.lppa_dual_init in DUAL_INITS,
                 f"lppa_dual_init = {self.lppa_dual_init!r}: expected one of {', '.join(DUAL_INITS)}"),
                (self.lppa_divergence in DIVERGENCE_FORMS,
                 f"lppa_divergence = {self.lppa_divergence!r}: expected one of "
                 f"{', '.join(DIVERGENCE_FORMS)}")]


def refuses(cfg) -> Optional[Tuple[str, str]]:
    if not network_info(cfg.model).site_prompts:
        return "model", (f"{cfg.model!r} has no site prompts or auxiliary decoder; FedLPPA "
                         "needs unet_lppa")
    if cfg.params.lppa_prompt != "universal":
        return "lppa_prompt", (f"{cfg.params.lppa_prompt!r}: only the learnt 'universal' prompts "
                               "are implemented (the reference's one-hot prompts are an ablation)")
    return None


def network_options(cfg) -> Dict[str, object]:
    if not network_info(cfg.model).site_prompts:
        return {}
    return {"label_prompt": bool(cfg.params.lppa_label_prompt),
            "attention": cfg.params.lppa_attention}


def prompt_affinity(distribution: np.ndarray, universal: np.ndarray) -> np.ndarray:
    """``C[i, k] = max(0, cos(P_i, P_k))`` with ``P_k`` = (distribution[k], universal)
    flattened; ``distribution`` (K, h, w), ``universal`` (1, h, w)."""
    flat = np.concatenate([distribution.reshape(len(distribution), -1),
                           np.repeat(universal.reshape(1, -1), len(distribution), axis=0)], axis=1)
    flat = flat.astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    cos = flat @ flat.T / np.maximum(np.outer(norms, norms), 1e-12)
    return np.maximum(cos, 0.0)


def aux_sources(affinity: np.ndarray, cids: Sequence[int], mode: str,
                rng: np.random.Generator) -> Dict[int, Dict[int, float]]:
    """For each site i in ``cids``: the weights over the sites (of ``cids``) whose auxiliary
    decoders form its own (rows of ``affinity`` are indexed by site id)."""
    out: Dict[int, Dict[int, float]] = {}
    for i in cids:
        if mode == "aggregated":
            out[i] = {k: float(affinity[i, k]) for k in cids}
        elif mode == "nearest":
            others = [k for k in cids if k != i] or [i]
            out[i] = {max(others, key=lambda k: affinity[i, k]): 1.0}
        elif mode == "adjacent":
            out[i] = {cids[(list(cids).index(i) - 1) % len(cids)]: 1.0}
        else:
            out[i] = {int(cids[rng.integers(len(cids))]): 1.0}
    return out


class FedLPPAServer(ALAServer):
    """Mean of everything, owned distribution prompts, per-site auxiliary decoders."""

    share_include = ("all",)

    def __init__(self, cfg, reporter=None, node_timeout: float = 600.0) -> None:
        super().__init__(cfg, reporter, node_timeout)
        #: client id -> the auxiliary decoder that client receives next round
        self.personal: Dict[int, Dict[str, np.ndarray]] = {}

    def aggregate_arrays(self, server_round: int, replies: Sequence[Mapping[str, np.ndarray]],
                         weights: Sequence[float]) -> Dict[str, np.ndarray]:
        mean = super().aggregate_arrays(server_round, replies, weights)
        if not mean:
            return mean
        cids = list(self.last_cids)
        by_cid = dict(zip(cids, replies))
        if self.params.lppa_prompt_owner:
            rows = np.array(mean[DISTRIBUTION_KEY], copy=True)
            for cid, arrays in by_cid.items():
                rows[cid] = arrays[DISTRIBUTION_KEY][cid]
            mean[DISTRIBUTION_KEY] = rows
        affinity = prompt_affinity(mean[DISTRIBUTION_KEY], mean[UNIVERSAL_KEY])
        rng = np.random.default_rng([self.cfg.seed, server_round])
        aux_keys = [k for k in mean if k.startswith(AUX_PREFIX)
                    and not k.endswith("num_batches_tracked")]
        for i, sources in aux_sources(affinity, cids, self.params.lppa_dual_init, rng).items():
            total = sum(sources.values())
            if total <= 0:  # no positive affinity: the plain mean
                self.personal.pop(i, None)
                continue
            self.personal[i] = {
                key: (sum(w * by_cid[k][key].astype(np.float64) for k, w in sources.items())
                      / total).astype(mean[key].dtype) for key in aux_keys}
        log.debug("round %d: prompt affinity of clients %s:\n%s", server_round, cids,
                  np.array2string(affinity[np.ix_(cids, cids)], precision=3))
        return mean

    def payload_for(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        cid = self.node_cid.get(int(node_id))
        if cid is None or cid not in self.personal:
            return arrays
        merged = to_numpy(arrays)
        merged.update(self.personal[cid])
        return to_record(merged)

    def state_dict(self) -> Dict[str, object]:
        return {"personal": {int(c): as_tensors(a) for c, a in self.personal.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.personal = {int(c): as_arrays(a) for c, a in dict(state.get("personal", {})).items()}


class FedLPPASite(ALARule):
    """Adaptive aggregation of the task decoder (after the warm-up), then FedLPPA's steps."""

    def local_train(self, trainer, server_round: int) -> Dict[str, float]:
        return trainer.run_steps(self.cfg.iters, lambda batch: self.loss_of(trainer, batch))

    def loss_of(self, trainer, batch) -> Tuple[torch.Tensor, Dict[str, object]]:
        """pCE (the run's objective on the main decoder) + alpha * prompt term + beta *
        pseudo-label term; the mixture weight is drawn from the step's seeded stream."""
        cfg, p = self.cfg, self.params
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            out = trainer.model.forward_train(batch["image"], site=trainer.cid)
        seg = float32_output(out.seg) if cfg.amp else out.seg
        result = trainer.objective(trainer.model, seg, batch["image"], batch["label"],
                                   site=trainer.cid, num_sites=cfg.num_clients)
        loss = result.total
        terms: Dict[str, object] = dict(result.terms)
        if p.lppa_alpha > 0:
            prompt = prompt_divergence_loss([f.float() for f in out.fused], trainer.cid,
                                            p.lppa_divergence)
            loss = loss + p.lppa_alpha * prompt
            terms["prompt"] = prompt.detach()
        if p.lppa_beta > 0:
            mix = float(torch.rand(()))
            pseudo = pseudo_label_dice_loss(seg.logits, out.aux_logits.float(), mix)
            loss = loss + p.lppa_beta * pseudo
            terms["pseudo"] = pseudo.detach()
        terms["total"] = loss.detach()
        return loss, terms


FEDLPPA = register_method(Method(
    name="FedLPPA", server=FedLPPAServer, site=FedLPPASite, params=FedLPPAParams,
    model="unet_lppa", procedure="pce", refuses=refuses, network_options=network_options,
    summary="learnt site prompts, prompt-similarity dual decoder, adaptive task-decoder aggregation"))

"""Site-contrastive loss on personalised channel-selection gates.

Wang et al., "Personalizing Federated Medical Image Segmentation via Local Calibration"
(FedLC), ECCV 2022; Lin et al., FedICRA, MLMI 2023.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.outputs import SegOutput


def site_contrastive_loss(model: nn.Module, out: SegOutput, site: int, num_sites: int,
                          grad: bool = True) -> Tensor:
    """Push the own site's gate away from the gates the other site codes would give.

    .. math::

        L_{sc} = -\\frac{1}{K-1} \\sum_{j \\ne k} \\mathrm{MSE}(h_k, \\mathrm{sg}(h_j))

    with :math:`h_k` = ``out.gates`` (B, C, 1, 1), the gate of the own site ``k = site``, and
    :math:`h_j` = ``model.site_gates(out.features, j)`` computed under ``torch.no_grad`` from
    detached bottleneck features. Only site *indices* of other sites are used: no data leave
    a site. The gate module has no BatchNorm and no dropout, so these extra evaluations
    change no running statistics whatever the model's train/eval mode.

    Parameters
    ----------
    model:
        Network exposing ``site_gates(features, site) -> (B, C, 1, 1)``.
    out:
        Its forward output for the current batch; ``out.gates`` and ``out.features`` must be set.
    site:
        Own site index k in ``[0, num_sites - 1]`` (site 0 is an ordinary site).
    num_sites:
        K. With K == 1 the loss is 0 (attached to ``out.gates`` when ``grad``).
    grad:
        True: the loss trains the gates (this project's default). False: the reference's
        behaviour, which evaluates the whole term under ``torch.no_grad``: the same value, but
        a constant without graph, so its weight ``alpha`` changes the logged total and never
        the training.

    Returns
    -------
    Tensor
        Scalar (<= 0); with ``grad`` the gradient reaches only ``out.gates`` (hence the PCS
        and encoder), without it the tensor has no graph.
    """
    if out.gates is None or out.features is None:
        raise ValueError("site_contrastive_loss needs out.gates and out.features (unet_lc* networks)")
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if isinstance(site, bool) or int(site) != site or not 0 <= site < num_sites:
        raise ValueError(f"site must be an integer in [0, {num_sites - 1}], got {site}")
    site = int(site)
    if not grad:
        with torch.no_grad():
            return site_contrastive_loss(model, out, site, num_sites, grad=True)
    own = out.gates
    if num_sites == 1:
        return own.sum() * 0.0
    features = out.features.detach()
    total = own.new_zeros(())
    with torch.no_grad():
        others = [model.site_gates(features, j) for j in range(num_sites) if j != site]
    for other in others:
        total = total + F.mse_loss(own, other)
    return -total / (num_sites - 1)

"""Element-wise adaptive local aggregation (FedALA, Zhang et al., AAAI 2023).

For every blended parameter the client keeps a weight tensor W in [0, 1] of the same shape and
forms ``theta = L + (G - L) * W`` from its previous local value L and the received global
value G. W is learned on local data by projected gradient steps
``W <- clip(W - eta * dLoss/dtheta * (G - L), 0, 1)``. W starts at 1 (pure global) and is kept
across rounds. The first active round repeats passes until the last ``num_pre_loss`` losses
have a standard deviation below ``threshold`` (at most ``max_epochs`` passes); later rounds
make one pass.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn


class AdaptiveAggregator:
    """Holds the element-wise weights W of one client and performs the blend."""

    def __init__(self, eta: float = 1.0, threshold: float = 0.1, num_pre_loss: int = 10,
                 max_epochs: int = 20) -> None:
        if eta < 0:
            raise ValueError(f"ala eta must be >= 0, got {eta}")
        self.eta = eta
        self.threshold = threshold
        self.num_pre_loss = num_pre_loss
        self.max_epochs = max_epochs
        self.weights: Optional[Dict[str, Tensor]] = None
        self.start_phase = True

    def blend(self, model: nn.Module, global_params: Mapping[str, Tensor],
              loss_fn: Callable[[nn.Module, Dict[str, Tensor]], Tensor],
              make_batches: Callable[[int], Iterable[Dict[str, Tensor]]]) -> List[float]:
        """Replace the named parameters of ``model`` by their learned blend with the global ones.

        Parameters
        ----------
        model : nn.Module
            The local model; parameters named in ``global_params`` hold L on entry and theta
            on return. Everything else in ``model`` is left as it is.
        global_params : mapping name -> Tensor
            G for every blended parameter (same shapes as the model's).
        loss_fn : callable(model, batch) -> scalar Tensor
            Local loss used to learn W.
        make_batches : callable(epoch) -> iterable of batches
            One pass over the local data used for learning W.

        Returns
        -------
        list of float
            The losses seen while learning W.
        """
        params = dict(model.named_parameters())
        names = list(global_params)
        local = {n: params[n].detach().clone() for n in names}
        glob = {n: global_params[n].detach().to(local[n].device, local[n].dtype) for n in names}
        if self.weights is None:
            self.weights = {n: torch.ones_like(local[n]) for n in names}
        if set(self.weights) != set(names):
            raise ValueError("the blended parameters changed between rounds: "
                             f"{sorted(set(self.weights) ^ set(names))}")
        delta = {n: glob[n] - local[n] for n in names}

        probe = copy.deepcopy(model)
        probe_params = dict(probe.named_parameters())
        for name, p in probe_params.items():
            p.requires_grad_(name in glob)
        self._apply(probe_params, local, delta)
        probe.train()

        losses: List[float] = []
        epoch = 0
        while True:
            for batch in make_batches(epoch):
                probe.zero_grad(set_to_none=True)
                loss = loss_fn(probe, batch)
                loss.backward()
                with torch.no_grad():
                    for n in names:
                        grad = probe_params[n].grad
                        if grad is not None:
                            self.weights[n] = torch.clamp(
                                self.weights[n] - self.eta * grad * delta[n], 0.0, 1.0)
                self._apply(probe_params, local, delta)
                losses.append(float(loss.detach()))
            epoch += 1
            if not self.start_phase or epoch >= self.max_epochs:
                break
            recent = losses[-self.num_pre_loss:]
            if len(losses) > self.num_pre_loss and float(np.std(recent)) < self.threshold:
                break
        self.start_phase = False
        with torch.no_grad():
            for n in names:
                params[n].copy_(probe_params[n])
        return losses

    def _apply(self, probe_params: Dict[str, nn.Parameter], local: Dict[str, Tensor],
               delta: Dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, w in self.weights.items():
                probe_params[n].copy_(local[n] + delta[n] * w)

    def state_dict(self) -> Dict[str, object]:
        return {"weights": None if self.weights is None else {k: v.cpu() for k, v in self.weights.items()},
                "start_phase": self.start_phase}

    def load_state_dict(self, state: Mapping[str, object], device: torch.device) -> None:
        weights = state["weights"]
        self.weights = None if weights is None else {k: v.to(device) for k, v in weights.items()}
        self.start_phase = bool(state["start_phase"])

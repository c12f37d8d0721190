"""Element-wise adaptive local aggregation (FedALA, Zhang et al., AAAI 2023).

For every blended parameter the client keeps a weight tensor W in [0, 1] of the same shape and
forms ``theta = L + (G - L) * W`` from its previous local value L and the received global
value G. W is learned on local data by projected gradient steps
``W <- clip(W - eta * dLoss/dtheta * (G - L), 0, 1)``, one step per batch. W starts at ``w_init``
(1: pure global, as FedALA) and is kept across rounds (``reset = True``: restarts at ``w_init``
at every call, as the reference FedICRA code does by accident). ``w_init = 0`` reproduces the reference
FedICRA code, which swaps the roles of G and L (``theta = G + (L - G) * W'`` with ``W' = 1`` at
the start): with ``W = 1 - W'`` the two parametrisations follow the same update, so only the
starting point differs.

Stopping rule, as in FedALA's ``ALA.adaptive_local_aggregation``: every call makes passes
(epochs) over ONE batch sequence, a random ``rand_percent`` subset of the local training data
drawn once per call (FedALA slices a fixed random window of its shuffled data and loads it
without shuffling, so every pass of a call sees the same batches in the same order). Each pass
records ONE loss, the loss of its last batch (computed before that batch's weight update). In
the start phase (the first active call) passes repeat until more than ``num_pre_loss`` losses
are recorded and the population standard deviation of the last ``num_pre_loss`` is below
``threshold``; later calls make one pass. ``max_epochs`` (> 0) caps the number of passes of a
call; FedALA has no cap (``max_epochs = 0``).
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
                 max_epochs: int = 20, w_init: float = 1.0, reset: bool = False) -> None:
        if not 0.0 <= w_init <= 1.0:
            raise ValueError(f"ala w_init must lie in [0, 1], got {w_init}")
        if eta < 0:
            raise ValueError(f"ala eta must be >= 0, got {eta}")
        if num_pre_loss < 1:
            raise ValueError(f"ala num_pre_loss must be >= 1, got {num_pre_loss}")
        if max_epochs < 0:
            raise ValueError(f"ala max_epochs must be >= 0 (0: no cap), got {max_epochs}")
        self.eta = eta
        self.threshold = threshold
        self.num_pre_loss = num_pre_loss
        self.max_epochs = max_epochs
        self.w_init = w_init
        #: W restarts at ``w_init`` at every call (the reference FedICRA code) instead of
        #: carrying over; the start phase still happens once
        self.reset = reset
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
            on return. Everything else in ``model`` is left as it is, buffers included: W is
            learned on a copy in train mode, whose BatchNorm statistics are discarded (FedALA
            learns on a deep copy of the local model in the same way).
        global_params : mapping name -> Tensor
            G for every blended parameter (same shapes as the model's).
        loss_fn : callable(model, batch) -> scalar Tensor
            Local loss used to learn W.
        make_batches : callable(epoch) -> iterable of batches
            One pass over the local data used for learning W. It must give the same batches
            for every ``epoch`` of one call (FedALA: one fixed subset per call).

        Returns
        -------
        list of float
            One loss per epoch: the loss of that epoch's last batch.

        Raises
        ------
        ValueError
            When the blended names differ from those of earlier rounds, or a pass has no batch.
        """
        params = dict(model.named_parameters())
        names = list(global_params)
        local = {n: params[n].detach().clone() for n in names}
        glob = {n: global_params[n].detach().to(local[n].device, local[n].dtype) for n in names}
        if self.weights is None or self.reset:
            self.weights = {n: torch.full_like(local[n], self.w_init) for n in names}
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
        while True:
            losses.append(self._epoch(probe, probe_params, names, local, delta, loss_fn,
                                      make_batches(len(losses))))
            if self._should_stop(losses):
                break
        self.start_phase = False
        with torch.no_grad():
            for n in names:
                params[n].copy_(probe_params[n])
        return losses

    def _epoch(self, probe: nn.Module, probe_params: Dict[str, nn.Parameter], names: List[str],
               local: Dict[str, Tensor], delta: Dict[str, Tensor],
               loss_fn: Callable[[nn.Module, Dict[str, Tensor]], Tensor],
               batches: Iterable[Dict[str, Tensor]]) -> float:
        """One pass: a W step per batch; returns the loss of the last batch."""
        last: Optional[Tensor] = None
        for batch in batches:
            probe.zero_grad(set_to_none=True)
            last = loss_fn(probe, batch)
            last.backward()
            with torch.no_grad():
                for n in names:
                    grad = probe_params[n].grad
                    if grad is not None:
                        self.weights[n] = torch.clamp(
                            self.weights[n] - self.eta * grad * delta[n], 0.0, 1.0)
            self._apply(probe_params, local, delta)
        if last is None:
            raise ValueError("adaptive aggregation got an empty pass: make_batches gave no batch")
        return float(last.detach())

    def _should_stop(self, losses: List[float]) -> bool:
        """FedALA's rule after each epoch (one loss per epoch in ``losses``), plus the cap."""
        if not self.start_phase:
            return True
        recent = losses[-self.num_pre_loss:]
        if len(losses) > self.num_pre_loss and float(np.std(recent)) < self.threshold:
            return True
        return self.max_epochs > 0 and len(losses) >= self.max_epochs

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

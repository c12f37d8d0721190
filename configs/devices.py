"""Which devices this machine offers: the one place that asks CUDA (and the NVIDIA driver).

Used by the pre-flight checks, the runner, the launcher, the trainers and ``test_client.py``.
Needs torch only (imported on first use, so that the launcher's driver check stays light); no
Flower.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("fedicra")

#: Warning logged when ``--gpus`` names GPUs but this process sees no CUDA device.
NO_CUDA_WARNING = "--gpus %s given but CUDA is not available: training on the CPU"


def cuda_available() -> bool:
    """Whether this process can use a CUDA device (``torch.cuda.is_available()``)."""
    import torch

    return torch.cuda.is_available()


def available_gpus() -> List[int]:
    """Ids of the CUDA devices this process sees, ``[0, 1, ...]``; ``[]`` without CUDA."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver (``nvidia-smi`` on the PATH or
    ``/proc/driver/nvidia``); asks no CUDA runtime, so child processes can still be pinned."""
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def usable_gpus(gpus: Sequence[int], logger: Optional[logging.Logger] = None) -> List[int]:
    """``gpus`` where CUDA is available here; else ``[]`` (the CPU), with a warning on
    ``logger`` when ``gpus`` named any."""
    if not gpus:
        return []
    if cuda_available():
        return list(gpus)
    (logger or log).warning(NO_CUDA_WARNING, gpus)
    return []


def pick_device(requested: Union[str, "torch.device", None] = "", gpus: Sequence[int] = (),
                logger: Optional[logging.Logger] = None) -> "torch.device":
    """The torch device to train or test on.

    Parameters
    ----------
    requested : str or torch.device
        An explicit device (``'cpu'``, ``'cuda:1'``): returned as is.
    gpus : sequence of int
        Without ``requested``: the run's ``--gpus``; the first one where CUDA is available,
        else the CPU with a warning on ``logger`` (:func:`usable_gpus`).
    logger : logging.Logger, optional
        Where that warning goes (default: ``fedicra``).

    Returns
    -------
    torch.device
        ``requested``; else ``cuda:<gpus[0]>`` (or the CPU, see above) when ``gpus`` is given;
        else the first visible CUDA device (``cuda``), else the CPU.
    """
    import torch

    if requested:
        return torch.device(requested)
    if gpus:
        usable = usable_gpus(gpus, logger)
        return torch.device(f"cuda:{usable[0]}" if usable else "cpu")
    return torch.device("cuda" if cuda_available() else "cpu")

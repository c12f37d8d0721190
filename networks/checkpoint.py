"""Checkpoint files: written atomically (a reader never sees a half-written file), read with
``torch.load(weights_only=True)`` (tensors and plain Python values only: a crafted file cannot
run code), and stamped with what they belong to (:func:`run_meta`), checked on loading."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

#: Keys of the metadata stamp every checkpoint of a run carries (``meta`` entry).
META_KEYS = ("task", "model", "strategy", "client")


def save_atomic(obj: Any, path: os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def copy_atomic(src: os.PathLike, dst: os.PathLike) -> None:
    """``dst`` becomes a copy of ``src`` in one step (a hard link where the file system allows
    it, so no bytes are copied; files written by :func:`save_atomic` are never changed in place,
    only replaced, so the link stays a faithful copy)."""
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_meta(cfg: Any, client: Optional[int]) -> dict:
    """The stamp of a checkpoint: task, network, strategy of run ``cfg`` and the client id
    (``-1`` for the server's global model)."""
    return {"task": str(cfg.img_class), "model": str(cfg.model), "strategy": str(cfg.strategy),
            "client": -1 if client is None else int(client)}


def as_tensors(arrays: Mapping[str, np.ndarray]) -> dict:
    """NumPy arrays as tensors, storable in a ``weights_only`` checkpoint."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def as_arrays(tensors: Mapping[str, torch.Tensor]) -> dict:
    """The inverse of :func:`as_tensors`: tensors back to NumPy arrays (same dtype, shape)."""
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def load_checkpoint(path: os.PathLike, map_location: Any = "cpu",
                    expect: Optional[Mapping[str, Any]] = None) -> Any:
    """Load a checkpoint written by :func:`save_atomic`; errors name the file.

    Only tensors and plain Python values are unpickled (``weights_only=True``): anything else,
    such as an object that would run code, is refused. With ``expect`` (a :func:`run_meta`
    dict) the file's ``meta`` stamp must agree on every key it names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several unrelated types for damaged files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: refused, not a plain tensor checkpoint of this project "
                         f"({reason})") from None
    if expect is not None:
        check_meta(state, path, expect)
    return state


def check_meta(state: Any, path: Path, expect: Mapping[str, Any]) -> None:
    """Raise a ValueError naming ``path`` and every field where its stamp differs."""
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: no metadata stamp (task, model, strategy, client); "
                         "not a checkpoint written by this version of the project")
    diff = [f"{k} {meta.get(k)!r} (expected {v!r})" for k, v in expect.items()
            if k in META_KEYS and meta.get(k) != v]
    if diff:
        raise ValueError(f"{path}: checkpoint of another run or client: {', '.join(diff)}")

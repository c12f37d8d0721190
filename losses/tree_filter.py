"""Learnable tree filter (Song et al., "Learnable Tree Filter for Structure-preserving Feature
Transform", NeurIPS 2019) in plain, device-agnostic PyTorch.

For a guide embedding ``g`` on an ``H x W`` grid, take the minimum spanning tree (MST) of the
4-connected grid with edge cost ``|g_u - g_v|^2`` and give each tree edge the weight
``w = exp(-|g_u - g_v|^2 / sigma)``. The filter output at pixel ``i`` is

    y_i = sum_j S_ij x_j / sum_j S_ij,   S_ij = product of w along the tree path i..j,

``S_ii = 1``. Rooting the tree (parent ``p(v)``, weight ``w_v`` of the edge ``v - p(v)``,
``w_root = 0``), the numerator is an upward then a downward pass:

    U(v) = x_v + sum_{children c} w_c U(c)
    D(root) = U(root),   D(v) = (1 - w_v^2) U(v) + w_v D(p(v))

(``D(v)`` adds to ``U(v)`` what the parent sees outside ``v``'s subtree, ``D(p) - w_v U(v)``,
times ``w_v``). The denominator is the same passes applied to ones.

Default path (``backend="torch"``): every stage takes O(log N) sequential rounds of
vectorised tensor operations on the input's device; see :func:`filter_on_tree` for the
passes and :mod:`losses.mst` for the tree. Reference path (``backend="scipy"``): scipy's MST
and breadth-first order, then a level-by-level sequential pass (the structure of the
reference CUDA code, one step per tree level).

The tree is discrete and is chosen under ``no_grad`` from the detached guide; the weights of
the chosen edges are recomputed differentiably, so gradients reach ``x`` and, when it
requires grad, the guide.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from losses.mst import RootedTree, rooted_mst, scipy_rooted_tree

__all__ = ["tree_filter", "build_tree", "tree_edge_weights", "flushed_exp", "filter_on_tree", "doubling_tables"]

_BACKENDS = ("torch", "scipy")


def tree_filter(
    x: Tensor,
    guide: Tensor,
    sigma: float,
    cost_offset: float = 0.0,
    backend: str = "torch",
) -> Tensor:
    """Filter ``x`` along the minimum spanning tree of ``guide``.

    Parameters
    ----------
    x : Tensor
        ``(B, K, H, W)`` values to filter (float32 or float64; half types are computed in
        float32).
    guide : Tensor
        ``(B, C, H, W)`` guide embedding on the same device. Edge cost is the squared L2
        distance between neighbouring guide vectors.
    sigma : float
        Edge weight ``w = exp(-cost / sigma)``, ``sigma > 0``.
    cost_offset : float
        Constant added to the MST cost only (the reference adds 1 for the image tree). A
        constant never changes which spanning tree is minimal, and it is kept out of the
        weights, as in the reference code, where an offset would only rescale every weight
        by ``exp(-offset / sigma)``.
    backend : {"torch", "scipy"}
        ``"torch"``: Boruvka MST, Euler-tour rooting and pointer-doubling passes, O(log N)
        rounds of tensor ops on ``x``'s device. ``"scipy"``: scipy MST + BFS on the CPU and a
        level-by-level sequential pass on ``x``'s device (reference / baseline). Both build
        the same tree (ties broken by edge id).

    Returns
    -------
    Tensor
        ``(B, K, H, W)`` filtered values, dtype of ``x``.

    Raises
    ------
    ValueError
        On mismatched shapes, devices, a non-positive sigma or an unknown backend.
    """
    _check_inputs(x, guide, sigma, backend)
    dtype = _compute_dtype(x, guide)
    guide_c = guide.to(dtype)
    tree, depth = build_tree(guide_c, cost_offset, backend)
    out = filter_on_tree(x.to(dtype), guide_c, tree, sigma, depth=depth)
    return out.to(x.dtype)


def build_tree(guide: Tensor, cost_offset: float = 0.0, backend: str = "torch") -> tuple[RootedTree, np.ndarray | None]:
    """Rooted MST of every image's grid (no gradient).

    Parameters
    ----------
    guide : Tensor
        ``(B, C, H, W)`` guide.
    cost_offset : float
        Constant added to every edge cost.
    backend : {"torch", "scipy"}
        Construction, see :func:`tree_filter`.

    Returns
    -------
    tuple
        ``(tree, depth)``; ``depth`` is the ``(B*H*W,)`` numpy vertex depth for the scipy
        backend (used by its level-by-level pass) and ``None`` for the torch backend.
    """
    if backend == "torch":
        return rooted_mst(guide, cost_offset), None
    if backend == "scipy":
        return scipy_rooted_tree(guide, cost_offset)
    raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def tree_edge_weights(guide: Tensor, tree: RootedTree, sigma: float) -> tuple[Tensor, Tensor]:
    """Differentiable scaled costs of the tree edges, per vertex (edge to its parent).

    Parameters
    ----------
    guide : Tensor
        ``(B, C, H, W)`` guide.
    tree : RootedTree
        Rooted forest of the guide's grids.
    sigma : float
        Weight scale.

    Returns
    -------
    tuple of Tensor
        ``s = |g_v - g_p(v)|^2 / sigma`` (the weight is ``exp(-s)``; ``inf`` at the roots,
        whose weight is 0) and ``1 - w**2`` (as ``-expm1(-2 s)``, accurate when ``w`` is
        close to 1; 1 at the roots), each ``(B*H*W,)``.
    """
    channels = guide.shape[1]
    flat = guide.transpose(0, 1).reshape(channels, -1)
    cost = (flat - flat.index_select(1, tree.parent)).square().sum(0)
    is_root = tree.parent == torch.arange(tree.parent.numel(), device=tree.parent.device)
    scaled = torch.where(is_root, float("inf"), cost / sigma)
    # clamped so that exp(-2 s) stays a normal number (see flushed_exp); 1 - w^2 is 1 there
    limit = -0.5 * math.log(torch.finfo(scaled.dtype).tiny)
    return scaled, -torch.expm1(-2.0 * scaled.clamp(max=limit))


def flushed_exp(scaled: Tensor) -> Tensor:
    """``exp(-scaled)``, with results below the smallest normal number flushed to 0.

    Subnormal floats are valid but make CPU arithmetic orders of magnitude slower; a weight
    below ``finfo.tiny`` changes a filter output (whose normaliser is >= 1) by less than
    ``N * finfo.tiny``.
    """
    limit = -math.log(torch.finfo(scaled.dtype).tiny)
    return torch.exp(-torch.where(scaled > limit, float("inf"), scaled))


def doubling_tables(parent: Tensor, scaled: Tensor) -> list[tuple[Tensor | None, Tensor, Tensor]]:
    """Ancestor tables for pointer doubling.

    Round ``k`` holds, for every vertex, its ``2**k``-th ancestor and the product of the
    weights on the way (0 when there is no such ancestor). Products are kept in log form
    (sums of scaled costs) and flushed to 0 below ``finfo.tiny`` (:func:`flushed_exp`). A
    product that is 0 stays 0, so once fewer than half of the listed vertices are alive the
    tables are compacted to those. The rounds stop when no product is left, after at most
    ``ceil(log2(depth + 1))`` rounds.

    Parameters
    ----------
    parent : Tensor
        ``(V,)`` int64 parents (roots point to themselves).
    scaled : Tensor
        ``(V,)`` scaled cost of each vertex's edge to its parent (weight ``exp(-scaled)``),
        ``inf`` at the roots.

    Returns
    -------
    list of tuple
        ``(vertices, ancestor, product)`` per round: ``vertices`` is ``None`` (all vertices,
        in order) or the ``(M_k,)`` int64 ids listed; ``ancestor`` and ``product`` are
        ``(M_k,)``; ``product`` is differentiable with respect to ``scaled``.
    """
    limit = -math.log(torch.finfo(scaled.dtype).tiny)
    total = parent.numel()
    tables: list[tuple[Tensor | None, Tensor, Tensor]] = []
    vertices: Tensor | None = None
    ancestor, path = parent, scaled
    while True:
        alive = path.detach() <= limit
        count = int(alive.sum())
        if count == 0:
            return tables
        if count <= path.numel() // 2:
            keep = torch.nonzero(alive).squeeze(1)
            vertices = keep if vertices is None else vertices.index_select(0, keep)
            ancestor, path = ancestor.index_select(0, keep), path.index_select(0, keep)
        tables.append((vertices, ancestor, flushed_exp(path)))
        if vertices is None:
            full_path, full_ancestor = path, ancestor
        else:  # vertices not listed are dead: infinite path
            full_path = scaled.new_full((total,), float("inf")).index_copy(0, vertices, path)
            full_ancestor = parent.index_copy(0, vertices, ancestor)
        # path to the 2**(k+1)-th ancestor = path to the 2**k-th + that one's own path
        path = path + full_path.index_select(0, ancestor)
        ancestor = full_ancestor.index_select(0, ancestor)


def filter_on_tree(
    x: Tensor,
    guide: Tensor,
    tree: RootedTree,
    sigma: float,
    depth: np.ndarray | None = None,
) -> Tensor:
    """Normalised tree filter of ``x`` on a given rooted tree.

    With ``A`` the operator that sends each vertex's value to its parent times ``w_v``, the
    upward pass is ``U = (I - A)^{-1} x = (I + A)(I + A^2)(I + A^4)... x`` and the downward
    pass ``D = (I - A^T)^{-1} ((1 - w^2) U)``, each factor one round of
    ``index_add`` / ``index_select`` over the tables of :func:`doubling_tables`. Without
    ``depth`` that is the default; with it, the passes walk the tree level by level.

    Parameters
    ----------
    x : Tensor
        ``(B, K, H, W)`` values.
    guide : Tensor
        ``(B, C, H, W)`` guide (for the edge weights).
    tree : RootedTree
        Rooted forest of the guide's grids.
    sigma : float
        Weight scale.
    depth : numpy.ndarray, optional
        ``(B*H*W,)`` vertex depths; selects the sequential level-by-level pass.

    Returns
    -------
    Tensor
        ``(B, K, H, W)`` filtered values.
    """
    batch, channels, height, width = x.shape
    scaled, keep = tree_edge_weights(guide, tree, sigma)
    values = x.transpose(0, 1).reshape(channels, -1)
    values = torch.cat([values, values.new_ones(1, values.shape[1])])  # row K: normaliser
    if depth is None:
        total = _passes_doubling(values, tree.parent, scaled, keep)
    else:
        total = _passes_levels(values, tree.parent, flushed_exp(scaled), keep, depth)
    out = total[:channels] / total[channels:]
    return out.reshape(channels, batch, height, width).transpose(0, 1)


def _passes_doubling(values: Tensor, parent: Tensor, scaled: Tensor, keep: Tensor) -> Tensor:
    """Upward and downward passes by pointer doubling; ``values`` is ``(K, V)``."""
    tables = doubling_tables(parent, scaled)
    up = values
    for vertices, ancestor, product in tables:
        source = up if vertices is None else up.index_select(1, vertices)
        up = up.index_add(1, ancestor, source * product)
    down = up * keep
    for vertices, ancestor, product in tables:
        gathered = down.index_select(1, ancestor) * product
        down = down + gathered if vertices is None else down.index_add(1, vertices, gathered)
    return down


def _passes_levels(values: Tensor, parent: Tensor, weight: Tensor, keep: Tensor, depth: np.ndarray) -> Tensor:
    """Upward and downward passes one tree level at a time; ``values`` is ``(K, V)``.

    The vertices are sorted by depth so that each level is a contiguous block; each level
    is one ``index_add`` (upward) or ``index_select`` (downward) into the previous one.
    """
    device = values.device
    order_np = np.argsort(depth, kind="stable")
    counts = np.bincount(depth).tolist()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty_like(order_np)
    position[order_np] = np.arange(order_np.size)
    parent_np = parent.cpu().numpy()[order_np]
    # parent's index inside the previous level's block
    local_parent = position[parent_np] - starts[np.maximum(depth[order_np] - 1, 0)]
    order = torch.from_numpy(order_np).to(device)
    local = torch.from_numpy(local_parent).to(device).split(counts)
    vals = values.index_select(1, order).split(counts, dim=1)
    weights = weight[order].split(counts)
    keeps = keep[order].split(counts)

    up = list(vals)
    for level in range(len(counts) - 1, 0, -1):
        up[level - 1] = up[level - 1].index_add(1, local[level], up[level] * weights[level])
    down = [up[0]]
    for level in range(1, len(counts)):
        down.append(keeps[level] * up[level] + weights[level] * down[level - 1].index_select(1, local[level]))
    inverse = torch.from_numpy(position).to(device)
    return torch.cat(down, dim=1).index_select(1, inverse)


def _compute_dtype(x: Tensor, guide: Tensor) -> torch.dtype:
    if x.dtype == torch.float64 or guide.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _check_inputs(x: Tensor, guide: Tensor, sigma: float, backend: str) -> None:
    if x.dim() != 4 or guide.dim() != 4:
        raise ValueError(f"x and guide must be (B, K, H, W) and (B, C, H, W), got {tuple(x.shape)} and {tuple(guide.shape)}")
    if x.shape[0] != guide.shape[0] or x.shape[2:] != guide.shape[2:]:
        raise ValueError(f"x {tuple(x.shape)} and guide {tuple(guide.shape)} differ in batch or spatial size")
    if x.device != guide.device:
        raise ValueError(f"x is on {x.device}, guide on {guide.device}")
    if not (x.is_floating_point() and guide.is_floating_point()):
        raise ValueError("x and guide must be floating point")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")

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
requires grad, the guide. The default path's backward pass is analytic (one more pair of
passes, no autograd graph over the rounds).

Work is O(N log N) for O(log N) sequential steps, against O(N) work for O(depth) steps for a
level-by-level walk; a random 256 x 256 MST has a depth of about 1,600. The results are
deterministic on the CPU; on CUDA, ``index_add_`` accumulates with atomics (reproducible to
rounding), or deterministically under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losses.mst import RootedTree, rooted_mst, scipy_rooted_tree

__all__ = ["tree_filter", "build_tree", "tree_edge_weights", "flushed_exp", "filter_on_tree", "doubling_tables"]

_BACKENDS = ("torch", "scipy")


def tree_filter(
    x: Tensor,
    guide: Tensor,
    sigma: float,
    cost_offset: float = 0.0,
    backend: str = "torch",
    simplex: bool = False,
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
    simplex : bool
        Declare that ``x`` sums to 1 over channels at every pixel (class probabilities).
        Then ``sum_j S_ij = sum_k (S x)_ik`` and the normaliser comes from the channel sum
        instead of a filtered channel of ones: one channel less to filter. The output is the
        same up to rounding; the gradient with respect to ``x`` may differ by a per-pixel
        constant over channels, i.e. only off the simplex (a softmax upstream removes it),
        and the gradient with respect to the guide is unchanged.

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
    out = filter_on_tree(x.to(dtype), guide_c, tree, sigma, depth=depth, simplex=simplex)
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
    return scaled, _one_minus_square(scaled)


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
    simplex: bool = False,
) -> Tensor:
    """Normalised tree filter of ``x`` on a given rooted tree.

    With ``A`` the operator that sends each vertex's value to its parent times ``w_v``, the
    upward pass is ``U = (I - A)^{-1} x = (I + A)(I + A^2)(I + A^4)... x`` and the downward
    pass ``D = (I - A^T)^{-1} ((1 - w^2) U)``, each factor one round of
    ``index_add`` / ``index_select`` over the tables of :func:`doubling_tables`; the
    backward pass is analytic (see ``_DoublingTreeFilter``). Without ``depth`` that is the
    default; with it, the passes walk the tree level by level under autograd.

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
    simplex : bool
        Normalise by the channel sum of ``S x`` instead of ``S 1``; see :func:`tree_filter`.

    Returns
    -------
    Tensor
        ``(B, K, H, W)`` filtered values.
    """
    batch, channels, height, width = x.shape
    scaled, keep = tree_edge_weights(guide, tree, sigma)
    values = x.transpose(0, 1).reshape(channels, -1)
    if depth is None:
        out = _DoublingTreeFilter.apply(values, scaled, tree.parent, simplex)
    elif simplex:
        total = _passes_levels(values, tree.parent, flushed_exp(scaled), keep, depth)
        out = total / total.sum(0, keepdim=True)
    else:
        values = torch.cat([values, values.new_ones(1, values.shape[1])])  # row K: normaliser
        total = _passes_levels(values, tree.parent, flushed_exp(scaled), keep, depth)
        out = total[:channels] / total[channels:]
    return out.reshape(channels, batch, height, width).transpose(0, 1)


def _up_pass(values: Tensor, tables: list[tuple[Tensor | None, Tensor, Tensor]]) -> Tensor:
    """``U = (I + A)(I + A^2)(I + A^4)... values`` for ``(R, V)`` values (no autograd)."""
    up = values.clone()
    scratch = torch.empty_like(up)  # reused: fresh large buffers cost page faults on CPU
    for vertices, ancestor, product in tables:
        if vertices is None:
            source = torch.mul(up, product, out=scratch)
        else:
            source = up.index_select(1, vertices).mul_(product)
        up.index_add_(1, ancestor, source)
    return up


def _down_pass(values: Tensor, tables: list[tuple[Tensor | None, Tensor, Tensor]]) -> Tensor:
    """``D = (I + A^T)(I + A^2T)... values`` for ``(R, V)`` values, in place (no autograd)."""
    down = values
    scratch = torch.empty_like(down)
    for vertices, ancestor, product in tables:
        if vertices is None:
            down.add_(torch.index_select(down, 1, ancestor, out=scratch).mul_(product))
        else:
            down.index_add_(1, vertices, down.index_select(1, ancestor).mul_(product))
    return down


class _DoublingTreeFilter(torch.autograd.Function):
    """Normalised tree filter by pointer doubling, with an analytic backward pass.

    Forward: ``Z = [x; 1]``, ``U = up(Z)``, ``D = down((1 - w^2) U)``, ``y = D_x / D_1``.

    Backward, for ``g = dL/dy``: with ``alpha = g / D_1`` and ``beta = sum_k alpha_k y_k``,
    ``dL/dS_ij = alpha_i . x_j - beta_i``. ``S`` is symmetric, so ``dL/dx = S alpha``: one
    more pair of passes, on ``Psi = [alpha; -beta]``. ``S_ij`` depends on the weight of edge
    ``v - p(v)`` iff the path i..j crosses it (``dS_ij/dw_v = S_ij / w_v``); splitting the
    pairs by the side of the edge each end lies on,

        dL/dw_v = sum over rows of  U_Psi(v) O_Z(v) + O_Psi(v) U_Z(v),

    where ``O(v) = D(p(v)) - w_v U(v)`` is what ``p(v)`` sees outside ``v``'s subtree. No
    autograd graph is kept for the ``O(log N)`` rounds: the backward costs one forward.

    With ``simplex``, ``Z = x`` and ``y = D_x / sum_k D_x,k``; then
    ``dL/dF = (g - sum_k g_k y_k) / sum_k F_k`` plays the part of ``Psi``.
    """

    @staticmethod
    def forward(ctx, values: Tensor, scaled: Tensor, parent: Tensor, simplex: bool) -> Tensor:  # noqa: D102
        tables = doubling_tables(parent, scaled)
        weight = flushed_exp(scaled)
        keep = _one_minus_square(scaled)
        if not simplex:
            values = torch.cat([values, values.new_ones(1, values.shape[1])])
        up = _up_pass(values, tables)
        down = _down_pass(up * keep, tables)
        out = down / down.sum(0, keepdim=True) if simplex else down[:-1] / down[-1:]
        ctx.tables, ctx.simplex = tables, simplex
        ctx.save_for_backward(parent, weight, keep, up, down, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # noqa: D102
        parent, weight, keep, up, down, out = ctx.saved_tensors
        projected = (grad_out * out).sum(0, keepdim=True)
        if ctx.simplex:  # y = F / sum_k F_k
            psi = (grad_out - projected) / down.sum(0, keepdim=True)
        else:  # y = F / n, rows [alpha; -beta]
            alpha = grad_out / down[-1:]
            psi = torch.cat([alpha, -projected / down[-1:]])
        up_psi = _up_pass(psi, ctx.tables)
        down_psi = _down_pass(up_psi * keep, ctx.tables)
        grad_scaled = None
        if ctx.needs_input_grad[1]:
            outside = down.index_select(1, parent) - weight * up
            outside_psi = down_psi.index_select(1, parent) - weight * up_psi
            grad_weight = (up_psi * outside + outside_psi * up).sum(0)
            grad_scaled = -weight * grad_weight
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_values = down_psi if ctx.simplex else down_psi[:-1]
        return grad_values, grad_scaled, None, None


def _one_minus_square(scaled: Tensor) -> Tensor:
    """``1 - exp(-scaled)**2`` as ``-expm1(-2 scaled)``, accurate for weights close to 1.

    Clamped so that ``exp(-2 scaled)`` stays a normal number (see :func:`flushed_exp`).
    """
    limit = -0.5 * math.log(torch.finfo(scaled.dtype).tiny)
    return -torch.expm1(-2.0 * scaled.clamp(max=limit))


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

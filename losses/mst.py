"""Minimum spanning trees of 4-connected pixel grids, built and rooted with tensor operations.

Everything here is discrete and runs without autograd: the tree structure is chosen from a
detached guide, the differentiable edge weights are computed later on the chosen edges
(see :mod:`losses.tree_filter`).

Grid conventions, for an ``H x W`` image with ``N = H * W`` pixels in row-major order:

* local edge ids ``0 .. H*(W-1)-1`` are horizontal edges ``(i, j) - (i, j+1)``, the
  remaining ``(H-1)*W`` ids are vertical edges ``(i, j) - (i+1, j)``; ``E`` edges in all;
* a batch of ``B`` images is one forest: vertex ``v`` of image ``b`` has global id
  ``b*N + v`` and edge ``e`` has global id ``b*E + e``;
* directions: 0 right, 1 down, 2 left, 3 up.

Two constructions give the same tree (ties are broken by edge id in both):

* :func:`boruvka_mst` + :func:`root_by_euler_tour`: O(log N) sequential rounds of vectorised
  tensor operations, on the input's device (CPU or GPU);
* :func:`scipy_rooted_tree`: scipy's Kruskal MST and breadth-first order, image by image on
  the CPU (the reference / fallback path).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RootedTree",
    "grid_edge_costs",
    "num_grid_edges",
    "edge_endpoints",
    "grid_edge_ends",
    "edge_keys",
    "boruvka_mst",
    "list_rank",
    "root_by_euler_tour",
    "rooted_mst",
    "scipy_rooted_tree",
]

# Low bits of an edge key hold an edge position or id; high bits order the edge costs.
_ID_BITS = 31
_ID_MASK = (1 << _ID_BITS) - 1
_INT64_MAX = torch.iinfo(torch.int64).max
_STEP_BITS = 20  # list_rank: bits for an element's offset behind its ruler


class RootedTree(NamedTuple):
    """A spanning forest of a batch of grids, one tree per image, rooted at pixel (0, 0).

    Attributes
    ----------
    parent : Tensor
        ``(B*N,)`` int64, global id of each vertex's parent; a root is its own parent. The
        tree edges are the pairs ``(v, parent[v])`` of the non-root vertices.
    num_rounds : int
        Boruvka rounds of the construction (0 for the scipy path).
    """

    parent: Tensor
    num_rounds: int


def num_grid_edges(height: int, width: int) -> int:
    """Number ``E`` of edges of the 4-connected ``height x width`` grid."""
    return height * (width - 1) + (height - 1) * width


def grid_edge_costs(guide: Tensor, cost_offset: float = 0.0) -> Tensor:
    """Squared L2 distance of the guide across every grid edge, plus ``cost_offset``.

    Parameters
    ----------
    guide : Tensor
        ``(B, C, H, W)`` guide embedding.
    cost_offset : float
        Constant added to every cost.

    Returns
    -------
    Tensor
        ``(B, E)`` costs in the grid's edge order (horizontal edges first).
    """
    batch = guide.shape[0]
    d_h = (guide[:, :, :, 1:] - guide[:, :, :, :-1]).square().sum(1).reshape(batch, -1)
    d_v = (guide[:, :, 1:, :] - guide[:, :, :-1, :]).square().sum(1).reshape(batch, -1)
    cost = torch.cat([d_h, d_v], dim=1)
    return cost + cost_offset if cost_offset else cost


def edge_endpoints(edge_ids: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Endpoints of grid edges given by global id (arithmetic form, for tests and tools).

    Parameters
    ----------
    edge_ids : Tensor
        ``(M,)`` int64 global edge ids ``b*E + e``.
    height, width : int
        Grid size.

    Returns
    -------
    tuple of Tensor
        ``u``, ``v``: ``(M,)`` int64 global vertex ids, ``v`` right of or below ``u``.
    """
    num_edges = num_grid_edges(height, width)
    num_h = height * (width - 1)
    image, local = edge_ids // num_edges, edge_ids % num_edges
    vertical = local >= num_h
    # horizontal edge e = i*(W-1) + j starts at i*W + j; vertical edge e' starts at e'
    u_h = local + local // max(width - 1, 1)
    u = torch.where(vertical, local - num_h, u_h) + image * (height * width)
    return u, u + torch.where(vertical, width, 1)


def grid_edge_ends(batch: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Endpoints of every grid edge of the batch, in global edge id order.

    Parameters
    ----------
    batch, height, width : int
        Batch size and grid size.
    device : torch.device
        Device of the result.

    Returns
    -------
    tuple of Tensor
        ``u``, ``v``: ``(B*E,)`` int64 global vertex ids, ``v`` right of or below ``u``.
    """
    vid = torch.arange(batch * height * width, device=device).view(batch, height, width)

    def side(h_slice: Tensor, v_slice: Tensor) -> Tensor:
        return torch.cat([h_slice.reshape(batch, -1), v_slice.reshape(batch, -1)], 1).reshape(-1)

    return side(vid[:, :, :-1], vid[:, :-1, :]), side(vid[:, :, 1:], vid[:, 1:, :])


def edge_keys(cost: Tensor) -> Tensor:
    """Integer keys that order edges by cost, with the low 31 bits zero.

    OR-ing an edge's position in an id-ordered edge list (or its id) into the low bits
    gives a strict order by (cost, edge id), which makes the MST unique.

    Parameters
    ----------
    cost : Tensor
        ``(B, E)`` float32 or float64 edge costs.

    Returns
    -------
    Tensor
        ``(B*E,)`` int64 keys.
    """
    flat = cost.reshape(-1)
    if flat.numel() > _ID_MASK:
        raise ValueError(f"too many grid edges ({flat.numel()}) for 31-bit edge ids")
    if flat.dtype == torch.float32:
        # IEEE-754 bits, made monotone over negative values, shifted to [0, 2**32)
        bits = flat.view(torch.int32).long()
        order_bits = torch.where(bits < 0, ~bits, bits + (1 << 31))
        return order_bits << _ID_BITS
    # exact ordering for float64: rank by a stable sort, so equal costs keep id order
    order = torch.sort(flat, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=flat.device)
    return rank << _ID_BITS


@torch.no_grad()
def boruvka_mst(
    cost: Tensor, height: int, width: int, ends: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, int]:
    """Minimum spanning forest of a batch of grids by Boruvka's algorithm with tensor ops.

    Each round, every component picks its cheapest outgoing edge (``scatter_reduce`` amin over
    keys ordered by (cost, edge id), so the choice is unique and no cycle other than a mutual
    pair can form), hooks onto the component at the other end, the mutual pairs are broken by
    component id, and labels are shortcut by pointer jumping. Intra-component edges are then
    dropped. At least half of the components disappear every round: O(log N) rounds. The
    first round, where components are pixels, is a dense minimum over the 4 neighbours;
    after it, the heaviest edge of every unit square is dropped as well (cycle property),
    which removes most parallel edges between components.

    Parameters
    ----------
    cost : Tensor
        ``(B, E)`` edge costs (float32 or float64) in grid edge order.
    height, width : int
        Grid size, ``E == num_grid_edges(height, width)``.
    ends : tuple of Tensor, optional
        ``grid_edge_ends(B, height, width, device)``, if already computed.

    Returns
    -------
    tuple
        ``(edge_ids, rounds)``: ``(B*(N-1),)`` int64 global ids of the tree edges (in no
        particular order) and the number of Boruvka rounds.
    """
    batch, num_edges = cost.shape
    if num_edges != num_grid_edges(height, width):
        raise ValueError(f"cost has {num_edges} edges, a {height}x{width} grid has {num_grid_edges(height, width)}")
    device = cost.device
    if num_edges == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), 0
    key_high = edge_keys(cost)
    if ends is None:
        ends = grid_edge_ends(batch, height, width, device)
    end_u, end_v = ends
    key = (key_high | torch.arange(key_high.numel(), device=device)).view(batch, -1)
    parent, chosen = _first_round(key, end_u, end_v, batch, height, width)
    chosen_all = [chosen]
    rounds = 1
    relabel, num_comp = _contract(parent)
    # edges left: between components and not the heaviest edge of a unit square
    label = relabel.view(batch, height, width)
    between = torch.cat(
        [
            (label[:, :, :-1] != label[:, :, 1:]).reshape(batch, -1),
            (label[:, :-1, :] != label[:, 1:, :]).reshape(batch, -1),
        ],
        dim=1,
    )
    edge_id = torch.nonzero((between & _square_light_edges(key, height, width)).reshape(-1)).squeeze(1)
    ends = torch.cat([end_u.index_select(0, edge_id), end_v.index_select(0, edge_id)])
    ends = relabel.index_select(0, ends).view(2, -1)
    key_high = key_high.index_select(0, edge_id)
    while edge_id.numel() > 0:
        rounds += 1
        # the position in the id-ordered edge list breaks cost ties by edge id
        key = key_high | torch.arange(edge_id.numel(), device=device)
        best = torch.full((num_comp,), _INT64_MAX, dtype=torch.int64, device=device)
        best.scatter_reduce_(0, ends[0], key, "amin")
        best.scatter_reduce_(0, ends[1], key, "amin")
        has_edge = best != _INT64_MAX
        pos = torch.where(has_edge, best & _ID_MASK, 0)
        cu, cv = ends.index_select(1, pos)
        ids = torch.arange(num_comp, device=device)
        parent = torch.where(has_edge, torch.where(cu == ids, cv, cu), ids)
        parent, hooked = _break_mutual_pairs(parent, ids)
        chosen_all.append(edge_id.index_select(0, pos.index_select(0, hooked)))
        relabel, num_comp = _contract(parent)
        ends = relabel.index_select(0, ends.reshape(-1)).view(2, -1)
        inter = torch.nonzero(ends[0] != ends[1]).squeeze(1)
        ends = ends.index_select(1, inter)
        key_high = key_high.index_select(0, inter)
        edge_id = edge_id.index_select(0, inter)
    return torch.cat(chosen_all), rounds


def _first_round(
    key: Tensor, end_u: Tensor, end_v: Tensor, batch: int, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Boruvka round on single-pixel components: each pixel's cheapest incident edge.

    ``key`` is ``(B, E)``, unique per edge. Returns the hook pointers ``(B*N,)`` and the ids
    of the edges chosen.
    """
    num_h = height * (width - 1)
    key_h = key[:, :num_h].view(batch, height, width - 1)
    key_v = key[:, num_h:].view(batch, height - 1, width)
    best = torch.full((batch, height, width), _INT64_MAX, dtype=torch.int64, device=key.device)
    best[:, :, :-1] = key_h  # edge to the right
    best[:, :, 1:] = torch.minimum(best[:, :, 1:], key_h)  # edge to the left
    best[:, :-1, :] = torch.minimum(best[:, :-1, :], key_v)  # edge below
    best[:, 1:, :] = torch.minimum(best[:, 1:, :], key_v)  # edge above
    best = best.reshape(-1)
    edge = best & _ID_MASK
    ids = torch.arange(best.numel(), device=best.device)
    parent = end_u.index_select(0, edge) + end_v.index_select(0, edge) - ids
    parent, hooked = _break_mutual_pairs(parent, ids)
    return parent, edge.index_select(0, hooked)


def _square_light_edges(key: Tensor, height: int, width: int) -> Tensor:
    """``(B, E)`` bool: False for the edges that are the heaviest of a unit square.

    By the cycle property such an edge (keys are unique) is in no minimum spanning tree.
    """
    batch = key.shape[0]
    num_h = height * (width - 1)
    key_h = key[:, :num_h].view(batch, height, width - 1)
    key_v = key[:, num_h:].view(batch, height - 1, width)
    light = torch.ones_like(key, dtype=torch.bool)
    if height < 2 or width < 2:
        return light
    square = torch.maximum(torch.maximum(key_h[:, :-1], key_h[:, 1:]), torch.maximum(key_v[:, :, :-1], key_v[:, :, 1:]))
    heavy_h = torch.zeros(batch, height, width - 1, dtype=torch.bool, device=key.device)
    heavy_h[:, :-1] |= key_h[:, :-1] == square  # top edge of the square below
    heavy_h[:, 1:] |= key_h[:, 1:] == square  # bottom edge of the square above
    heavy_v = torch.zeros(batch, height - 1, width, dtype=torch.bool, device=key.device)
    heavy_v[:, :, :-1] |= key_v[:, :, :-1] == square  # left edge of the square on the right
    heavy_v[:, :, 1:] |= key_v[:, :, 1:] == square  # right edge of the square on the left
    return ~torch.cat([heavy_h.reshape(batch, -1), heavy_v.reshape(batch, -1)], 1)


def _break_mutual_pairs(parent: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Make the smaller id of each pair that chose the same edge a root.

    Returns the hook pointers and the indices of the hooked (non-root) components.
    """
    mutual = (parent.index_select(0, parent) == ids) & (ids < parent)
    parent = torch.where(mutual, ids, parent)
    return parent, torch.nonzero(parent != ids).squeeze(1)


def _contract(parent: Tensor) -> tuple[Tensor, int]:
    """New component label of every old one, after shortcutting the hook forest."""
    while True:  # pointer jumping until every component points at its root
        grand = parent.index_select(0, parent)
        if torch.equal(grand, parent):
            break
        parent = grand
    is_root = parent == torch.arange(parent.numel(), device=parent.device)
    new_label = torch.cumsum(is_root, 0) - 1
    return new_label.index_select(0, parent), int(new_label[-1]) + 1


@functools.lru_cache(maxsize=None)
def _next_direction_table(device: torch.device) -> Tensor:
    """``(64,)`` table: entry ``mask*4 + d`` is the first direction after ``d``
    (cyclically: d+1, d+2, d+3, d) whose bit is set in the 4-bit ``mask``; 0 for mask 0."""
    table = torch.zeros(16, 4, dtype=torch.int64)
    for mask in range(1, 16):
        for d in range(4):
            for k in range(1, 5):
                if mask >> ((d + k) % 4) & 1:
                    table[mask, d] = (d + k) % 4
                    break
    return table.reshape(-1).to(device)


def _direction_masks(in_tree: Tensor, batch: int, height: int, width: int) -> Tensor:
    """``(B*N,)`` int64 4-bit masks of the tree edges at each pixel (bit d: direction d)."""
    num_h = height * (width - 1)
    flags = in_tree.view(batch, -1).long()
    right = flags[:, :num_h].view(batch, height, width - 1)
    down = flags[:, num_h:].view(batch, height - 1, width)
    mask = torch.zeros(batch, height, width, dtype=torch.int64, device=in_tree.device)
    mask[:, :, :-1] |= right
    mask[:, :-1, :] |= down << 1
    mask[:, :, 1:] |= right << 2  # left
    mask[:, 1:, :] |= down << 3  # up
    return mask.view(-1)


@torch.no_grad()
def root_by_euler_tour(
    edge_ids: Tensor, batch: int, height: int, width: int, ends: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Orient a spanning forest of grids towards pixel (0, 0) of each image.

    The Euler tour of a tree visits every edge twice, once in each direction; the direction
    taken first (from the root) points from parent to child. The tour's successor of the
    arc ``u -> v`` is the arc leaving ``v`` right after ``v -> u`` in ``v``'s cyclic list of
    directions (0 right, 1 down, 2 left, 3 up); the tours are cut at each root and ranked
    with :func:`list_rank` (pointer jumping).

    Parameters
    ----------
    edge_ids : Tensor
        ``(B*(N-1),)`` int64 global ids of the tree edges, any order.
    batch, height, width : int
        Batch size and grid size.
    ends : tuple of Tensor, optional
        ``grid_edge_ends(batch, height, width, device)``, if already computed.

    Returns
    -------
    Tensor
        ``(B*N,)`` int64 parent of each vertex; roots point to themselves.
    """
    device = edge_ids.device
    num_vertices = height * width
    total = batch * num_vertices
    vertex = torch.arange(total, device=device)
    num_tree = edge_ids.numel()
    if num_tree == 0:
        return vertex
    end_u, end_v = grid_edge_ends(batch, height, width, device) if ends is None else ends
    # sorted edge ids keep neighbouring arcs of the tour close in memory (a bucket sort)
    in_tree = torch.zeros(end_u.numel(), dtype=torch.bool, device=device).index_fill_(0, edge_ids, True)
    edge_ids = torch.nonzero(in_tree).squeeze(1)
    u, v = end_u.index_select(0, edge_ids), end_v.index_select(0, edge_ids)
    direction = (v - u == width).long()  # 0: v right of u, 1: v below u

    src = torch.cat([u, v])
    dst = torch.cat([v, u])
    arc_dir = torch.cat([direction, direction + 2])
    num_arcs = 2 * num_tree
    arc = torch.arange(num_arcs, device=device)
    src_slot = src * 4 + arc_dir
    slot = torch.zeros(4 * total, dtype=torch.int64, device=device).index_copy_(0, src_slot, arc)
    mask = _direction_masks(in_tree, batch, height, width)
    table = _next_direction_table(device)
    next_dir = table.index_select(0, mask.index_select(0, dst) * 4 + ((arc_dir + 2) & 3))
    successor = slot.index_select(0, dst * 4 + next_dir)

    roots = torch.arange(batch, device=device) * num_vertices
    first_dir = table.index_select(0, mask.index_select(0, roots) * 4 + 3)
    first_arc = slot.index_select(0, roots * 4 + first_dir)
    is_first = torch.zeros(num_arcs, dtype=torch.bool, device=device)
    is_first[first_arc] = True
    is_last = is_first.index_select(0, successor)
    successor = torch.where(is_last, arc, successor)
    remaining = list_rank(successor, first_arc, max_length=num_arcs // batch)
    down = remaining[:num_tree] > remaining[num_tree:]  # u -> v comes first: u is the parent
    child = torch.where(down, v, u)
    return vertex.index_copy(0, child, torch.where(down, u, v))


@torch.no_grad()
def list_rank(
    successor: Tensor,
    heads: Tensor,
    method: str | None = None,
    spacing_bits: int = 3,
    max_length: int | None = None,
) -> Tensor:
    """Distance of every element of a set of linked lists to the end of its list.

    ``method="wyllie"``: plain pointer jumping on all ``L`` elements, ``ceil(log2(L))``
    rounds (``L`` the longest list) of two gathers and no host synchronisation; the default on GPUs, where the
    ``O(L log L)`` work is cheap and each sequential step costs a kernel launch.

    ``method="rulers"`` (the default on the CPU, where the work is what costs):
    work-efficient pointer jumping. About one element in ``2**spacing_bits`` (chosen by a
    multiplicative hash of its index, so the choice is deterministic but unrelated to the
    list order), plus every head and tail, becomes a ruler. All rulers walk forward in
    lockstep to the next ruler, labelling the elements they pass; the walks take as many
    steps as the longest gap, about ``2**spacing_bits * ln(L)``. Then Wyllie's pointer
    jumping ranks the ruler lists (``L / 2**spacing_bits`` elements, ``log2`` rounds), and
    every element gets its ruler's rank minus its offset. Plain pointer jumping on all
    ``L`` elements does ``log2(L)`` times more work.

    Parameters
    ----------
    successor : Tensor
        ``(L,)`` int64 next element; a list's tail points to itself.
    heads : Tensor
        ``(M,)`` int64 first element of every list.
    method : {"rulers", "wyllie"}, optional
        Default: ``"rulers"`` on the CPU, ``"wyllie"`` elsewhere.
    spacing_bits : int
        log2 of the mean ruler spacing.
    max_length : int, optional
        Length of the longest list, if known (fewer Wyllie rounds).

    Returns
    -------
    Tensor
        ``(L,)`` int64 number of steps from each element to its list's tail.
    """
    if method is None:
        method = "rulers" if successor.device.type == "cpu" else "wyllie"
    if method == "wyllie":
        return _wyllie(successor, successor.numel() if max_length is None else max_length)
    if method != "rulers":
        raise ValueError(f"method must be 'rulers' or 'wyllie', got {method!r}")
    length = successor.numel()
    device = successor.device
    element = torch.arange(length, device=device)
    is_tail = successor == element
    is_ruler = (((element * 2654435761) & 0xFFFFFFFF) >> (32 - spacing_bits)) == 0
    is_ruler |= is_tail
    is_ruler[heads] = True
    rulers = torch.nonzero(is_ruler).squeeze(1)
    num_rulers = rulers.numel()
    ruler_ids = torch.arange(num_rulers, device=device)
    ruler_id = torch.zeros(length, dtype=torch.int64, device=device).index_copy_(0, rulers, ruler_ids)
    # label = (owner ruler << 20) | steps behind it; rulers own themselves at offset 0
    label = ruler_id << _STEP_BITS
    walker = torch.nonzero(~is_tail.index_select(0, rulers)).squeeze(1)
    current = successor.index_select(0, rulers.index_select(0, walker))
    step = 1
    while walker.numel() > 0:
        if step >= 1 << _STEP_BITS:
            raise RuntimeError("list_rank: gap between rulers too long")
        going = torch.nonzero(~is_ruler.index_select(0, current)).squeeze(1)
        walker, current = walker.index_select(0, going), current.index_select(0, going)
        label.index_copy_(0, current, (walker << _STEP_BITS) | step)
        current = successor.index_select(0, current)
        step += 1
    owner, offset = label >> _STEP_BITS, label & ((1 << _STEP_BITS) - 1)
    # each element followed by a ruler links its owner to that ruler
    before = torch.nonzero(is_ruler.index_select(0, successor) & ~is_tail).squeeze(1)
    after = successor.index_select(0, before)
    linked = owner.index_select(0, before)
    next_ruler = ruler_ids.index_copy(0, linked, ruler_id.index_select(0, after))
    gap = torch.zeros_like(ruler_ids).index_copy_(0, linked, offset.index_select(0, before) + 1)
    while True:  # Wyllie's pointer jumping on the ruler lists
        gap = gap + gap.index_select(0, next_ruler)
        jumped = next_ruler.index_select(0, next_ruler)
        if torch.equal(jumped, next_ruler):
            break
        next_ruler = jumped
    return gap.index_select(0, owner) - offset


def _wyllie(successor: Tensor, max_length: int) -> Tensor:
    """Pointer jumping on every element: ``ceil(log2(L))`` rounds, no host synchronisation."""
    element = torch.arange(successor.numel(), device=successor.device)
    remaining = (successor != element).long()
    for _ in range(max(max_length - 1, 1).bit_length()):
        remaining = remaining + remaining.index_select(0, successor)
        successor = successor.index_select(0, successor)
    return remaining


@torch.no_grad()
def rooted_mst(guide: Tensor, cost_offset: float = 0.0) -> RootedTree:
    """Minimum spanning forest of the guide's grids, rooted, with tensor ops on its device.

    Parameters
    ----------
    guide : Tensor
        ``(B, C, H, W)`` float32 or float64 guide; edge cost is the squared L2 distance of
        neighbouring guide vectors plus ``cost_offset``.
    cost_offset : float
        Constant added to every edge cost before the tree is chosen. It never changes which
        tree is minimal, only how floating-point rounding merges nearly equal costs.

    Returns
    -------
    RootedTree
        ``num_rounds`` is the number of Boruvka rounds.
    """
    batch, _, height, width = guide.shape
    cost = grid_edge_costs(guide.detach(), cost_offset)
    ends = grid_edge_ends(batch, height, width, guide.device)
    edge_ids, rounds = boruvka_mst(cost, height, width, ends)
    return RootedTree(root_by_euler_tour(edge_ids, batch, height, width, ends), rounds)


@torch.no_grad()
def scipy_rooted_tree(guide: Tensor, cost_offset: float = 0.0) -> tuple[RootedTree, np.ndarray]:
    """Reference construction: scipy MST and breadth-first order, one image at a time.

    scipy drops zero-weight edges and breaks ties its own way, so it is given the rank of
    each edge in the (cost, edge id) order (1-based) instead of the cost: the minimum
    spanning tree for these distinct weights is the one :func:`boruvka_mst` returns.

    Parameters
    ----------
    guide : Tensor
        ``(B, C, H, W)`` guide (any device; the tree is computed on the CPU).
    cost_offset : float
        As in :func:`rooted_mst`.

    Returns
    -------
    tuple
        ``(tree, depth)``: the rooted forest on the guide's device and ``(B*N,)`` int64
        numpy depths of the vertices (0 at the roots).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

    batch, _, height, width = guide.shape
    num_vertices, num_edges = height * width, num_grid_edges(height, width)
    keys = edge_keys(grid_edge_costs(guide.detach(), cost_offset)).cpu().numpy().reshape(batch, num_edges)
    local_u, local_v = (t.numpy() for t in grid_edge_ends(1, height, width, torch.device("cpu")))
    parent = np.arange(batch * num_vertices)
    depth = np.zeros(batch * num_vertices, dtype=np.int64)
    for b in range(batch):
        if num_vertices == 1:
            continue
        offset = b * num_vertices
        order = np.lexsort((np.arange(num_edges), keys[b]))
        weight = np.empty(num_edges)
        weight[order] = np.arange(1, num_edges + 1)
        graph = coo_matrix((weight, (local_u, local_v)), shape=(num_vertices, num_vertices)).tocsr()
        mst = minimum_spanning_tree(graph)
        visit, pred = breadth_first_order(mst, 0, directed=False, return_predecessors=True)
        parent[offset + visit[1:]] = offset + pred[visit[1:]]
        depth[offset + visit] = _bfs_depths(visit, pred)
    return RootedTree(torch.from_numpy(parent).to(guide.device), 0), depth


def _bfs_depths(visit: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Depths of the vertices in breadth-first order ``visit`` (indexed by position).

    In BFS order the parents' positions are non-decreasing, so each level is the run of
    vertices whose parents lie in the previous level.
    """
    depth = np.zeros(visit.size, dtype=np.int64)
    position = np.empty(visit.size, dtype=np.int64)
    position[visit] = np.arange(visit.size)
    parent_position = np.zeros(visit.size, dtype=np.int64)
    parent_position[1:] = position[pred[visit[1:]]]
    end, level = 1, 0
    while end < visit.size:
        nxt = end + int(np.searchsorted(parent_position[end:], end, side="left"))
        level += 1
        depth[end:nxt] = level
        end = nxt
    return depth

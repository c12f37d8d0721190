"""Tree filter and grid MST: brute force, scipy, ties, gradients, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from losses.mst import (
    boruvka_mst,
    list_rank,
    edge_endpoints,
    grid_edge_costs,
    num_grid_edges,
    rooted_mst,
    scipy_rooted_tree,
)
from losses.tree_filter import build_tree, doubling_tables, tree_edge_weights, tree_filter


def _grid_graph(cost: np.ndarray, height: int, width: int) -> coo_matrix:
    """Grid graph of one image with weights ``cost + 1`` (scipy drops zero weights)."""
    n, e = height * width, num_grid_edges(height, width)
    u, v = edge_endpoints(torch.arange(e), height, width)
    return coo_matrix((cost + 1.0, (u.numpy(), v.numpy())), shape=(n, n))


def brute_force_tree_filter(x: torch.Tensor, guide: torch.Tensor, sigma: float) -> torch.Tensor:
    """O(N^2) tree filter in float64: scipy MST, then S_ij by a walk from every vertex.

    Independent of the code under test apart from the grid edge numbering; needs a guide
    without tied edge costs (its MST is then unique).
    """
    batch, k, height, width = x.shape
    n = height * width
    out = np.zeros((batch, k, n))
    for b in range(batch):
        g = guide[b].detach().double().reshape(guide.shape[1], n).numpy()
        cost = grid_edge_costs(guide[b : b + 1].detach().double())[0].numpy()
        mst = minimum_spanning_tree(_grid_graph(cost, height, width).tocsr()).tocoo()
        adjacency = [[] for _ in range(n)]
        for p, q in zip(mst.row, mst.col):
            w = np.exp(-((g[:, p] - g[:, q]) ** 2).sum() / sigma)
            adjacency[p].append((q, w))
            adjacency[q].append((p, w))
        s = np.zeros((n, n))
        for i in range(n):
            s[i, i] = 1.0
            stack, seen = [i], {i}
            while stack:
                p = stack.pop()
                for q, w in adjacency[p]:
                    if q not in seen:
                        seen.add(q)
                        s[i, q] = s[i, p] * w
                        stack.append(q)
        xf = x[b].detach().double().reshape(k, n).numpy()
        out[b] = (xf @ s.T) / s.sum(1)
    return torch.from_numpy(out.reshape(batch, k, height, width))


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 9), (3, 1, 6, 6), (1, 2, 8, 1), (2, 1, 1, 1)])
@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_matches_brute_force(shape, backend):
    batch, k, height, width = shape
    x = _rand(*shape, seed=1)
    guide = _rand(batch, 3, height, width, seed=2)
    expected = brute_force_tree_filter(x, guide, 0.3)
    got = tree_filter(x, guide, 0.3, backend=backend)
    assert got.shape == x.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sigma", [1e-3, 1e3])
def test_extreme_sigma_matches_brute_force(sigma):
    """Tiny sigma: weights underflow (flushed to 0); huge sigma: weights ~1, deep doubling."""
    x, guide = _rand(2, 2, 6, 9, seed=3), _rand(2, 1, 6, 9, seed=4)
    torch.testing.assert_close(tree_filter(x, guide, sigma), brute_force_tree_filter(x, guide, sigma), rtol=0, atol=1e-10)


def test_deep_path_tree():
    """A 1 x 200 line is a path of depth 199: 8 doubling rounds, all weights close to 1."""
    x, guide = _rand(1, 2, 1, 200, seed=5), 0.01 * _rand(1, 1, 1, 200, seed=6)
    tree, _ = build_tree(guide)
    scaled, _ = tree_edge_weights(guide, tree, 1.0)
    assert len(doubling_tables(tree.parent, scaled)) == 8
    torch.testing.assert_close(tree_filter(x, guide, 1.0), brute_force_tree_filter(x, guide, 1.0), rtol=0, atol=1e-10)


def test_float32_close_to_float64():
    x, guide = _rand(2, 2, 16, 12, seed=7), _rand(2, 3, 16, 12, seed=8)
    ref = tree_filter(x, guide, 0.5)
    got = tree_filter(x.float(), guide.float(), 0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    half = tree_filter(x.half(), guide.float(), 0.5)
    assert half.dtype == torch.float16


def test_constant_input_is_fixed_point():
    x = torch.ones(2, 3, 7, 5, dtype=torch.float64) * torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(tree_filter(x, _rand(2, 1, 7, 5), 0.1), x, rtol=0, atol=1e-14)


def _scipy_total(cost: np.ndarray, height: int, width: int) -> float:
    mst = minimum_spanning_tree(_grid_graph(cost, height, width).tocsr())
    return float(mst.sum()) - (height * width - 1)


def _assert_spanning_forest(edge_ids: torch.Tensor, batch: int, height: int, width: int) -> None:
    n, e = height * width, num_grid_edges(height, width)
    assert edge_ids.numel() == batch * (n - 1)
    assert torch.unique(edge_ids).numel() == edge_ids.numel()
    u, v = edge_endpoints(edge_ids, height, width)
    assert torch.equal(u // n, edge_ids // e) and torch.equal(v // n, edge_ids // e)
    graph = coo_matrix((np.ones(u.numel()), (u.numpy(), v.numpy())), shape=(batch * n, batch * n))
    assert connected_components(graph, directed=False)[0] == batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(9, 13), (1, 17), (17, 1), (24, 24)])
def test_mst_total_cost_matches_scipy(dtype, size):
    height, width = size
    cost = _rand(3, num_grid_edges(height, width), seed=9, dtype=dtype)
    edge_ids, rounds = boruvka_mst(cost, height, width)
    _assert_spanning_forest(edge_ids, 3, height, width)
    assert rounds <= int(np.ceil(np.log2(height * width)))
    total = cost.reshape(-1)[edge_ids.sort().values].double().reshape(3, -1).sum(1)
    for b in range(3):
        assert total[b].item() == pytest.approx(_scipy_total(cost[b].double().numpy(), height, width), rel=1e-12)


@pytest.mark.parametrize("levels", [1, 3])
def test_mst_with_ties(levels):
    """Constant (all costs 0) and heavily quantised costs: still a minimum spanning tree."""
    height, width, batch = 11, 8, 2
    raw = _rand(batch, num_grid_edges(height, width), seed=10, dtype=torch.float32)
    cost = torch.floor(raw * levels) if levels > 1 else torch.zeros_like(raw)
    edge_ids, _ = boruvka_mst(cost, height, width)
    _assert_spanning_forest(edge_ids, batch, height, width)
    total = cost.reshape(-1)[edge_ids.sort().values].double().reshape(batch, -1).sum(1)
    for b in range(batch):
        assert total[b].item() == pytest.approx(_scipy_total(cost[b].double().numpy(), height, width), abs=1e-9)


def test_constant_guide_tree_and_filter():
    x = _rand(2, 2, 6, 7, seed=11)
    guide = torch.full((2, 1, 6, 7), 0.5, dtype=torch.float64)
    tree, _ = build_tree(guide)
    assert int((tree.parent == torch.arange(tree.parent.numel())).sum()) == 2
    out_t, out_s = tree_filter(x, guide, 1.0), tree_filter(x, guide, 1.0, backend="scipy")
    torch.testing.assert_close(out_t, out_s, rtol=0, atol=1e-12)
    # weights 1 everywhere: the filter is the mean over the image
    torch.testing.assert_close(out_t, x.mean((2, 3), keepdim=True).expand_as(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["rulers", "wyllie"])
@pytest.mark.parametrize("sizes", [[1], [2, 1, 5], [300, 7, 1000, 64]])
def test_list_rank(method, sizes):
    generator = torch.Generator().manual_seed(sum(sizes))
    order = torch.randperm(sum(sizes), generator=generator)
    successor = torch.empty_like(order)
    expected = torch.empty_like(order)
    heads = []
    for chunk in order.split(sizes):
        successor[chunk[:-1]], successor[chunk[-1]] = chunk[1:], chunk[-1]
        expected[chunk] = torch.arange(chunk.numel() - 1, -1, -1)
        heads.append(chunk[0])
    assert torch.equal(list_rank(successor, torch.stack(heads), method=method), expected)


def _depths(parent: torch.Tensor) -> torch.Tensor:
    """Depth of every vertex by pointer doubling; fails if the pointers do not reach a root."""
    depth = (parent != torch.arange(parent.numel())).long()
    anc = parent.clone()
    for _ in range(64):
        if torch.equal(anc[anc], anc):
            return depth
        depth, anc = depth + depth[anc], anc[anc]
    raise AssertionError("parent pointers contain a cycle")


@pytest.mark.parametrize("quantise", [False, True])
def test_rooted_tree_torch_equals_scipy(quantise):
    height, width = 13, 10
    guide = _rand(3, 2, height, width, seed=12, dtype=torch.float32)
    if quantise:
        guide = torch.round(guide * 3) / 3  # many tied costs
    tree = rooted_mst(guide, cost_offset=1.0)
    ref, depth = scipy_rooted_tree(guide, cost_offset=1.0)
    assert torch.equal(tree.parent, ref.parent)
    roots = torch.arange(3) * height * width
    assert torch.equal(tree.parent[roots], roots)
    assert torch.equal(_depths(tree.parent), torch.from_numpy(depth))
    # every parent is a grid neighbour in the same image
    vertex = torch.arange(tree.parent.numel())
    diff = (tree.parent - vertex).abs()
    assert bool(((diff == 1) | (diff == width) | (diff == 0)).all())
    assert torch.equal(tree.parent // (height * width), vertex // (height * width))


def test_torch_equals_scipy_filter_with_ties():
    x = _rand(2, 3, 20, 17, seed=13, dtype=torch.float32)
    guide = torch.round(_rand(2, 1, 20, 17, seed=14, dtype=torch.float32) * 4) / 4
    got = tree_filter(x, guide, 0.2, cost_offset=1.0)
    ref = tree_filter(x, guide, 0.2, cost_offset=1.0, backend="scipy")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_cost_offset_does_not_change_result():
    x, guide = _rand(2, 2, 9, 8, seed=15), _rand(2, 2, 9, 8, seed=16)
    torch.testing.assert_close(tree_filter(x, guide, 0.3, cost_offset=1.0), tree_filter(x, guide, 0.3), rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_gradcheck(backend):
    x = _rand(2, 2, 3, 4, seed=17).requires_grad_()
    guide = _rand(2, 2, 3, 4, seed=18).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, g: tree_filter(a, g, 0.5, backend=backend), (x, guide))


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_simplex_mode(backend):
    """Probability inputs: same values; through a softmax, same gradients."""
    logits = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    guide = _rand(2, 2, 5, 6, seed=24)
    weights = _rand(2, 3, 5, 6, seed=25)
    results = []
    for simplex in (False, True):
        z, g = logits.clone().requires_grad_(), guide.clone().requires_grad_()
        out = tree_filter(torch.softmax(z, 1), g, 0.4, backend=backend, simplex=simplex)
        (out * weights).sum().backward()
        results.append((out.detach(), z.grad, g.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    x = _rand(1, 2, 3, 4, seed=26).requires_grad_()
    g = _rand(1, 2, 3, 4, seed=27).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: tree_filter(a, b, 0.5, backend=backend, simplex=True), (x, g))


def test_gradient_flows_to_guide_only_through_weights():
    x = _rand(1, 2, 5, 6, seed=19)
    guide = _rand(1, 2, 5, 6, seed=20).requires_grad_()
    tree_filter(x, guide, 0.5).square().sum().backward()
    assert guide.grad is not None and guide.grad.abs().sum() > 0


def test_deterministic():
    x = _rand(3, 2, 32, 29, seed=21, dtype=torch.float32).requires_grad_()
    guide = _rand(3, 3, 32, 29, seed=22, dtype=torch.float32).requires_grad_()
    results = []
    for _ in range(2):
        out = tree_filter(x, guide, 0.05, cost_offset=1.0)
        gx, gg = torch.autograd.grad(out.square().sum(), (x, guide))
        results.append((out, gx, gg))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_invalid_inputs():
    x = torch.rand(1, 2, 4, 4)
    with pytest.raises(ValueError, match="differ"):
        tree_filter(x, torch.rand(1, 1, 4, 5), 1.0)
    with pytest.raises(ValueError, match="differ"):
        tree_filter(x, torch.rand(2, 1, 4, 4), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        tree_filter(x, torch.rand(1, 1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="backend"):
        tree_filter(x, torch.rand(1, 1, 4, 4), 1.0, backend="cuda")
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        tree_filter(torch.rand(2, 4, 4), torch.rand(2, 4, 4), 1.0)

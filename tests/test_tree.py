"""The tree: sizes, padding, the retrieved set's coverage, and orderings, against brute force."""

import math

import pytest
import torch

from tca_env import search as S
from tca_env.tree import Aggregator, build_tree, order_tokens, tree_depth

NS = [1, 2, 3, 5, 17, 128, 1000]
BS = [2, 3, 4]


def brute_depth(n: int, b: int) -> int:
    """floor(log_b(n - 1)) by search over real logarithms, 0 for n <= 2."""
    if n <= 2:
        return 0
    k = math.floor(math.log(n - 1) / math.log(b) + 1e-9)
    assert b**k <= n - 1 < b ** (k + 1)
    return k


def make_tree(n, b, B=2, D=8, ordering="natural", coords=None, seed=0):
    torch.manual_seed(seed)
    enc = torch.randn(B, n, D)
    return build_tree(enc, b, Aggregator(D, 2, 16), ordering, coords)


def random_path(tree, M, gen):
    """A random valid root-to-leaf path per query (only real children), built by a slow loop."""
    B = tree.tokens.shape[0]
    shape = tree.shape
    path = torch.zeros(B, M, shape.k + 1, dtype=torch.long)
    for bi in range(B):
        for m in range(M):
            node = 0
            for s in range(shape.k):
                kids = [node * shape.b + c for c in range(shape.b) if tree.node_mask[s + 1][bi, node * shape.b + c]]
                node = kids[torch.randint(len(kids), (1,), generator=gen).item()]
                path[bi, m, s + 1] = node
    return path


@pytest.mark.parametrize("b", BS)
@pytest.mark.parametrize("n", NS)
def test_retrieved_size_matches_formula(n, b, gen):
    k = brute_depth(n, b)
    P = math.ceil(n / b**k)
    assert tree_depth(n, b) == k
    tree = make_tree(n, b)
    assert tree.shape.retrieved_size == (b - 1) * k + P
    rs = S.retrieved_set(tree, random_path(tree, 3, gen))
    assert rs.index.shape[-1] == (b - 1) * k + P
    # Every real token sits in exactly one slot; padding fills the rest.
    assert tree.tokens.shape[1] == P * b**k
    assert int(tree.token_mask[0].sum()) == n
    assert sorted(tree.token_index[0][tree.token_mask[0]].tolist()) == list(range(n))


@pytest.mark.parametrize("b", BS)
@pytest.mark.parametrize("n", NS)
def test_full_receptive_field(n, b, gen):
    """Every real token is in S or under exactly one node of S; padding never enters S unmasked."""
    tree = make_tree(n, b)
    shape = tree.shape
    k, P = shape.k, shape.P
    rs = S.retrieved_set(tree, random_path(tree, 4, gen))
    B, M, _ = rs.index.shape
    for bi in range(B):
        real = set(torch.nonzero(tree.token_mask[bi]).flatten().tolist())
        for m in range(M):
            covered = []
            for j in range(rs.index.shape[-1]):
                lvl, idx, ok = int(rs.level[j]), int(rs.index[bi, m, j]), bool(rs.mask[bi, m, j])
                if lvl == k + 1:
                    under = {idx}
                else:
                    span = b ** (k - lvl) * P
                    under = set(range(idx * span, (idx + 1) * span))
                if not under & real:
                    assert not ok, "a padded node or slot entered S unmasked"
                if ok:
                    covered.extend(under & real)
                else:
                    assert not under & real, "a real node was masked out of S"
            assert sorted(covered) == sorted(real)


def test_node_mask_means_subtree_has_tokens():
    tree = make_tree(17, 3)
    shape = tree.shape
    for lvl in range(shape.k + 1):
        counts = shape.counts(lvl)
        assert torch.equal(tree.node_mask[lvl][0], counts > 0)
        assert int(counts.sum()) == 17
    # Balanced: siblings differ by at most one token.
    leaf_counts = shape.counts(shape.k).view(-1, shape.b)
    assert int((leaf_counts.max(1).values - leaf_counts.min(1).values).max()) <= 1


def test_padded_nodes_are_finite_and_zero():
    tree = make_tree(5, 4)  # k = 1, P = 2: 4 buckets of 2 slots, 3 slots padded
    for lvl, nodes in enumerate(tree.nodes):
        assert torch.isfinite(nodes).all()
        assert (nodes[~tree.node_mask[lvl]] == 0).all()


@pytest.mark.parametrize("n,b", [(37, 2), (64, 2), (50, 3), (100, 4)])
def test_kd_ordering_leaf_buckets_are_median_split_cells(n, b):
    """Brute force: rebuild the recursive median split per context set and compare leaf buckets."""
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(3, n, 2, generator=g)
    tree = make_tree(n, b, B=3, ordering="kd", coords=coords)
    shape = tree.shape

    def split(ids, level, pts):
        if level == shape.k:
            return [sorted(ids)]
        ids = sorted(ids, key=lambda i: (pts[i, level % 2].item(), i))
        sizes = [len(ids) // b + (1 if j < len(ids) % b else 0) for j in range(b)]
        out, start = [], 0
        for sz in sizes:
            child = ids[start:start + sz]
            if child and start:  # cells: every point of a child lies beyond the previous child's points
                assert pts[child[0], level % 2] >= pts[ids[start - 1], level % 2]
            out += split(child, level + 1, pts)
            start += sz
        return out

    for bi in range(3):
        expected = split(list(range(n)), 0, coords[bi])
        ti = tree.token_index[bi].view(b**shape.k, shape.P)
        got = [sorted(x for x in row.tolist() if x >= 0) for row in ti]
        assert got == expected


def test_orderings_are_permutations_and_sorted():
    g = torch.Generator().manual_seed(2)
    coords = torch.rand(2, 33, 3, generator=g)
    for ordering in ("natural", "coord", "projection", "kd"):
        perm = order_tokens(coords, 33, 2, ordering, coord=1)
        assert torch.equal(perm.sort(1).values, torch.arange(33).expand(2, 33))
    perm = order_tokens(coords, 33, 2, "coord", coord=1)
    vals = coords[..., 1].gather(1, perm)
    assert (vals[:, 1:] >= vals[:, :-1]).all()


def test_bad_inputs_raise_clear_errors():
    agg = Aggregator(8, 2, 16)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        build_tree(torch.randn(4, 8), 2, agg)
    with pytest.raises(ValueError, match="at least one token"):
        build_tree(torch.randn(2, 0, 8), 2, agg)
    with pytest.raises(ValueError, match="branch factor"):
        tree_depth(5, 1)
    with pytest.raises(ValueError, match="unknown ordering"):
        order_tokens(torch.rand(1, 5, 2), 5, 2, "hilbert")
    with pytest.raises(ValueError, match="needs coordinates"):
        order_tokens(None, 5, 2, "kd")


def test_bptt_controls_gradient_into_encodings():
    enc = torch.randn(2, 9, 8, requires_grad=True)
    agg = Aggregator(8, 2, 16)
    build_tree(enc, 2, agg, bptt=False).nodes[1].sum().backward()
    assert enc.grad is None or (enc.grad == 0).all()
    assert agg.attn.q.weight.grad is not None and agg.attn.q.weight.grad.abs().sum() > 0
    build_tree(enc, 2, agg, bptt=True).nodes[1].sum().backward()
    assert enc.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 128, 1000])
@pytest.mark.parametrize("b", [2, 3, 4])
def test_padded_levels_match_the_masks(n, b):
    """TreeShape.padded(level) says whether a level holds padded entries; check it against the masks of
    a built tree (levels 0..k) and the token mask (level k+1)."""
    tree = make_tree(n, b)
    for level in range(tree.shape.k + 1):
        assert tree.shape.padded(level) == (not bool(tree.node_mask[level].all()))
    assert tree.shape.padded(tree.shape.k + 1) == (not bool(tree.token_mask.all()))

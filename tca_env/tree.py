"""The tree of Tree Cross Attention: ordering, padding, level tensors and bottom-up aggregation.

A tree over N tokens with branch factor b has k = max{k : b^k <= N - 1} levels of branching
(k = 0 when N <= 2) and b^k leaf buckets of P = ceil(N / b^k) slots. It is not a pointer structure:
level l (1 <= l <= k) is a tensor of b^l node embeddings in left-to-right order, the children of node
i at level l are nodes i*b .. i*b + b-1 at level l+1, and leaf bucket i (level k) holds token slots
i*P .. i*P + P-1 of the padded token tensor ``[B, b^k * P, D]``.

Padding. The paper pads to P*b^k slots; we spread the real tokens over the buckets recursively
(the children of a node with n tokens get floor(n/b) or ceil(n/b) of them, the extra ones going to
the leftmost children), so every subtree is as balanced as it can be and a k-d ordering splits
each node at its median. Which slots are real depends only on N, so it is shared by the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import backend
from .layers import EncoderLayer
from .tasks.base import ORDERINGS


def tree_depth(n: int, b: int) -> int:
    """k = floor(log_b(n - 1)) computed exactly in integers (0 for n <= 2)."""
    if n < 1:
        raise ValueError(f"a tree needs at least one token; got N = {n}")
    if b < 2:
        raise ValueError(f"branch factor must be >= 2; got b = {b}")
    k = 0
    while b ** (k + 1) <= n - 1:
        k += 1
    return k


def retrieved_size(n: int, b: int) -> int:
    """|S| = (b - 1) * k + P, the number of slots a query attends to (padded slots included)."""
    k = tree_depth(n, b)
    return (b - 1) * k + -(-n // b**k)


@lru_cache(maxsize=64)
def _layout(n: int, b: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Token counts per node at each level 0..k (``[b^l]`` each), and the padded slot of each ordered token
    (``[N]``); tensor code, so a tree over 2^20 tokens lays out in milliseconds."""
    k = tree_depth(n, b)
    P = -(-n // b**k)
    counts = [torch.tensor([n])]
    j = torch.arange(b)
    for _ in range(k):
        c = counts[-1].unsqueeze(-1)  # [b^l, 1]
        counts.append((c // b + (j < c % b)).flatten())  # the extra tokens go to the leftmost children
    leaf = counts[-1]
    start = torch.cumsum(leaf, 0) - leaf  # first ordered token of each bucket
    bucket = _owner(leaf, n)  # [N]
    slots = bucket * P + torch.arange(n) - start[bucket]
    return tuple(counts), slots


def _layout_of(n: int, b: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    # torch.compile traces the function under the cache (the layout is a constant of the graph, keyed by n, b)
    return _layout.__wrapped__(n, b) if torch.compiler.is_compiling() else _layout(n, b)


def _owner(counts: torch.Tensor, n: int) -> torch.Tensor:
    """Which of consecutive groups of sizes ``counts`` (summing to n) each of n items falls in: ``[n]``.
    (The output size is given, so the shape is static and torch.compile traces it.)"""
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=n)


@dataclass(frozen=True)
class TreeShape:
    """Sizes of the tree over ``n`` tokens with branch factor ``b`` (independent of the batch)."""

    n: int
    b: int

    @property
    def k(self) -> int:
        return tree_depth(self.n, self.b)

    @property
    def P(self) -> int:  # noqa: N802
        return -(-self.n // self.b**self.k)

    @property
    def num_slots(self) -> int:
        return self.P * self.b**self.k

    @property
    def retrieved_size(self) -> int:
        return (self.b - 1) * self.k + self.P

    @property
    def num_nodes(self) -> int:
        """Nodes below the root: ``b + b^2 + ... + b^k`` (the rows of a level-by-level node table)."""
        return self.offset(self.k + 1)

    def offset(self, level: int) -> int:
        """First row of ``level`` (1..k) in a table of the nodes of levels 1..k, level by level:
        ``b + ... + b^(level-1)``. A multiple of b, so a node's b children are one aligned block of rows."""
        return (self.b**level - self.b) // (self.b - 1)

    def counts(self, level: int) -> torch.Tensor:
        """Real tokens under each node of ``level`` (0 = root, k = leaf buckets): ``[b^level]``."""
        return _layout_of(self.n, self.b)[0][level]

    def padded(self, level: int) -> bool:
        """Whether ``level`` (0..k nodes, k+1 the token slots) has padded entries (a function of N alone)."""
        if level > self.k:
            return self.n != self.num_slots
        # Counts are balanced (they differ by at most one within a level): a level has an empty node iff
        # it has more nodes than tokens.
        return self.b**level > self.n

    def slot_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Padded slot of the t-th ordered token: ``[N]`` long."""
        return _layout_of(self.n, self.b)[1].to(device)

    def slot_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Which of the ``P * b^k`` slots hold a real token: ``[P * b^k]`` bool."""
        mask = torch.zeros(self.num_slots, dtype=torch.bool, device=device)
        mask[self.slot_index(device)] = True
        return mask


# --------------------------------------------------------------------------------------------- ordering

def _projection_vector(dim: int, device: torch.device) -> torch.Tensor:
    # Fixed across runs and processes: the projection is part of the tree's definition.
    g = torch.Generator().manual_seed(1234 + dim)
    w = torch.randn(dim, generator=g)
    return (w / w.norm()).to(device)


def order_tokens(coords: torch.Tensor | None, n: int, b: int, ordering: str, coord: int = 0,
                 batch_size: int | None = None) -> torch.Tensor:
    """Permutation ``[B, N]`` listing the tokens in the order the tree's slots take them.

    Args:
        coords: ``[B, N, dx]`` coordinates (``None`` allowed for ``"natural"``).
        ordering: ``"natural"`` (as given), ``"coord"`` (sort by coordinate ``coord``), ``"projection"``
            (sort by a fixed random projection), ``"kd"`` (recursive median splits cycling through the
            coordinates: the tokens of each node are sorted along coordinate ``level % dx`` and dealt to
            its children in order, so every node is one cell of the k-d split).
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"unknown ordering {ordering!r}; choose one of {ORDERINGS}")
    if ordering == "natural":
        B = coords.shape[0] if coords is not None else batch_size
        device = coords.device if coords is not None else "cpu"
        return torch.arange(n, device=device).expand(B, n)
    if coords is None or coords.dim() != 3 or coords.shape[1] != n:
        raise ValueError(f"ordering {ordering!r} needs coordinates [B, {n}, dx]")
    dx = coords.shape[-1]
    if ordering == "coord":
        if not 0 <= coord < dx:
            raise ValueError(f"sort coordinate {coord} out of range for dx = {dx}")
        return torch.argsort(coords[..., coord], dim=1, stable=True)
    if ordering == "projection":
        return torch.argsort(coords @ _projection_vector(dx, coords.device), dim=1, stable=True)
    # k-d: one pass per level. The tokens of a node stay contiguous, so sorting every node along its split
    # coordinate at once is one stable sort of the integer key (node id, order code of the value).
    shape = TreeShape(n, b)
    B = coords.shape[0]
    codes = [_order_code(coords[..., c]) for c in range(min(dx, shape.k))]  # [B, N] int64 each, < 2^32
    perm = torch.arange(n, device=coords.device).expand(B, n)
    for level in range(shape.k):
        node_of = _owner(shape.counts(level).to(coords.device), n)  # [N]
        key = (node_of << 32) + codes[level % dx].gather(1, perm)  # [B, N], < 2^bits
        bits = 32 + (b**level - 1).bit_length()
        if B << bits < 2**63:  # one flat sort (2-3x faster than a row-wise one): rows as high bits
            flat = (key + (torch.arange(B, device=key.device) << bits).unsqueeze(1)).view(-1)
            idx = flat.sort(stable=True).indices.view(B, n) - torch.arange(B, device=key.device).unsqueeze(1) * n
        else:
            idx = key.sort(dim=1, stable=True).indices
        perm = perm.gather(1, idx)
    return perm


def _order_code(v: torch.Tensor) -> torch.Tensor:
    """Integers in ``[0, 2^32)`` ordered as the values ``v [B, N]`` (equal values, equal codes).

    Half and single precision: the IEEE bit pattern read as an integer, negatives reflected (exact, no sort).
    Double precision: the dense rank of each value in its row (one sort).
    """
    if v.dtype == torch.float64:
        s, idx = v.sort(dim=1)
        rank = torch.zeros_like(idx)
        rank[:, 1:] = (s[:, 1:] != s[:, :-1]).cumsum(1)
        return torch.empty_like(idx).scatter_(1, idx, rank)
    bits = (v.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits) + 2**31


# ------------------------------------------------------------------------------------------- aggregation

class Aggregator(EncoderLayer):
    """Agg(children) = the mean over the real children of one encoder layer applied over the children.

    The layer is :class:`~tca_env.layers.EncoderLayer` (the reference's form); padded children are
    masked out of its attention and of the mean. A node is real if any of its children is.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x ``[G, c, D]`` groups of c children, mask ``[G, c]`` -> node ``[G, D]``, node mask ``[G]``.

        ``mask=None`` means every child is real (node mask None).
        """
        h = super().forward(x, mask)  # [G, c, D]
        if mask is None:
            return h.mean(1), None
        w = mask.to(h.dtype).unsqueeze(-1)  # [G, c, 1]
        # A fully padded group averages nothing: its node is 0 and masked.
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0), mask.any(1)


@dataclass
class Tree:
    """A batch of trees.

    Attributes:
        shape: sizes (n, b, k, P).
        tokens: ``[B, P*b^k, D]`` leaf token embeddings in slot order (padded slots are zero).
        token_mask: ``[B, P*b^k]`` which slots are real.
        nodes: ``nodes[l]`` is ``[B, b^l, D]`` for l = 0..k (``nodes[0]`` is the root).
        node_mask: ``node_mask[l]`` is ``[B, b^l]``.
        perm: ``[B, N]`` the ordering: slot ``slot_index[t]`` holds context token ``perm[:, t]``.
    """

    shape: TreeShape
    tokens: torch.Tensor
    token_mask: torch.Tensor
    nodes: list[torch.Tensor]
    node_mask: list[torch.Tensor]
    perm: torch.Tensor

    @property
    def token_index(self) -> torch.Tensor:
        """``[B, P*b^k]`` the context index held by each slot (-1 for padding)."""
        B = self.perm.shape[0]
        out = torch.full((B, self.shape.num_slots), -1, dtype=torch.long, device=self.perm.device)
        out[:, self.shape.slot_index(self.perm.device)] = self.perm
        return out


def aggregate(aggregator: Aggregator, x: torch.Tensor, mask: torch.Tensor | None,
              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``aggregator`` over groups ``x [G, c, D]`` (``mask [G, c]``), at most ``chunk`` children per call.

    Groups are independent, so chunking changes no value; it bounds the aggregator's temporaries (its
    attention, normalisations and feed-forward over every child) to ``chunk`` rows instead of all G*c.

    The full chunks, all of one shape, run on the active backend (:mod:`tca_env.backend`): under ``"compile"``
    one compiled graph serves every full chunk of every level (it fuses the normalisations, the attention over
    the children and the GEGLU: the whole build at 2^20 tokens took 6.15 s against 7.99 s eager on one CPU thread,
    medians of 5 alternations); a level's last, smaller chunk runs eagerly, so no build size recompiles it.
    """
    G, c, D = x.shape
    if chunk is None or G * c <= chunk:
        return aggregator(x, mask)
    step = max(1, chunk // c)
    node = x.new_empty(G, D)
    node_mask = None if mask is None else mask.new_empty(G)
    on_backend = not torch.compiler.is_compiling()  # inside a compiled graph already: trace the plain call
    for g0 in range(0, G, step):
        g1 = min(G, g0 + step)
        args = (x[g0:g1], None if mask is None else mask[g0:g1])
        out, m = backend.call(aggregator, "forward", *args) if on_backend and g1 - g0 == step else aggregator(*args)
        node[g0:g1] = out
        if m is not None:
            node_mask[g0:g1] = m
    return node, node_mask


def gather_rows(table: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``table [B, R, ...]``, ``idx [B, M, c]`` row indices -> ``[B, M, c, ...]`` (one flat index_select).

    ``out`` is an optional flat workspace (no autograd) reused across calls: a fresh multi-MiB buffer per
    gather costs more in page faults on a CPU than the gather itself (8x at L = 1,024).
    """
    B, R = table.shape[:2]
    flat = (idx + (torch.arange(B, device=idx.device) * R).view(B, 1, 1)).reshape(-1)
    src = table.reshape(B * R, -1)  # 2-D index_select is the fast path
    if out is None:
        rows = src.index_select(0, flat)
    else:
        rows = torch.index_select(src, 0, flat, out=out[: flat.numel() * src.shape[1]].view(-1, src.shape[1]))
    return rows.view(*idx.shape, *table.shape[2:])


def take_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table [B, R, ...]``, one row index per entry ``idx [B, M]`` -> ``[B, M, ...]`` (:func:`gather_rows`)."""
    return gather_rows(table, idx.unsqueeze(-1)).squeeze(2)


def build_tree(enc: torch.Tensor, b: int, aggregator: Aggregator, ordering: str = "natural",
               coords: torch.Tensor | None = None, coord: int = 0, bptt: bool = False,
               chunk: int | None = None, perm: torch.Tensor | None = None) -> Tree:
    """Order, pad and aggregate ``enc [B, N, D]`` into a :class:`Tree`.

    With ``bptt=False`` (the paper's default) the aggregator's input is detached at every level, so
    the encoder learns only through the read-out and the tree through the aggregator's own weights.
    ``chunk``: at most this many rows per aggregator call (see :func:`aggregate`; None: one call per level).
    ``perm``: the ordering (:func:`order_tokens` of ``coords``), already applied to ``enc``, whose rows are then
    taken as they come (a caller that embeds the tokens in the tree's order saves moving ``N x D`` encodings).
    Nothing of size ``[N, N]`` is ever formed; the tree's own tensors are ~2x ``enc``.
    """
    if enc.dim() != 3:
        raise ValueError(f"context encodings must be [B, N, D]; got shape {tuple(enc.shape)}")
    B, N, D = enc.shape
    if B == 0:
        raise ValueError("empty batch: B = 0")
    shape = TreeShape(N, b)
    if perm is None:
        perm = order_tokens(coords, N, b, ordering, coord, batch_size=B)  # [B, N]
        # Rows by one flat index_select: a gather with its index expanded over D reads an index per element (at
        # 2^20, 1.5 s against 0.19 s in one profile).
        ordered = enc if ordering == "natural" else take_rows(enc, perm)
    elif perm.shape != (B, N):
        raise ValueError(f"perm must be [B, N] = [{B}, {N}]; got {tuple(perm.shape)}")
    else:
        ordered = enc
    if N == shape.num_slots:  # no padding: the slots are the ordered tokens (no copy)
        tokens = ordered
    else:
        tokens = enc.new_zeros(B, shape.num_slots, D)
        tokens[:, shape.slot_index(enc.device)] = ordered  # [B, P*b^k, D]
    del ordered, enc  # the caller may have handed over its only reference: free it before aggregating
    token_mask = shape.slot_mask(tokens.device).expand(B, -1)  # [B, P*b^k]

    k, P = shape.k, shape.P
    # Masks are handed to the aggregator only where a level has padding (it depends on N alone).
    x = tokens.reshape(B * b**k, P, D)
    m = None if N == shape.num_slots else token_mask.reshape(B * b**k, P)
    nodes: list[torch.Tensor] = [tokens.new_empty(0)] * (k + 1)
    masks: list[torch.Tensor] = [token_mask.new_empty(0)] * (k + 1)
    for level in range(k, -1, -1):
        node, nm = aggregate(aggregator, x if bptt else x.detach(), m, chunk)  # [B*b^level, D]
        if nm is None:
            nm = torch.ones(B * b**level, dtype=torch.bool, device=tokens.device)
        nodes[level], masks[level] = node.reshape(B, b**level, D), nm.reshape(B, b**level)
        if level > 0:
            x = node.reshape(B * b ** (level - 1), b, D)
            m = nm.reshape(B * b ** (level - 1), b) if shape.padded(level) else None
    return Tree(shape, tokens, token_mask, nodes, masks, perm)

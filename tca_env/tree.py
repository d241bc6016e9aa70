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


@lru_cache(maxsize=256)
def _layout(n: int, b: int) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Token counts per node at each level 0..k, and the padded slot of each ordered token."""
    k = tree_depth(n, b)
    P = -(-n // b**k)
    counts: list[tuple[int, ...]] = [(n,)]
    for _ in range(k):
        counts.append(tuple(c // b + (1 if j < c % b else 0) for c in counts[-1] for j in range(b)))
    slots = tuple(leaf * P + j for leaf, c in enumerate(counts[-1]) for j in range(c))
    return tuple(counts), slots


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

    def counts(self, level: int) -> torch.Tensor:
        """Real tokens under each node of ``level`` (0 = root, k = leaf buckets): ``[b^level]``."""
        return torch.tensor(_layout(self.n, self.b)[0][level])

    def padded(self, level: int) -> bool:
        """Whether ``level`` (0..k nodes, k+1 the token slots) has padded entries (a function of N alone)."""
        if level > self.k:
            return self.n != self.num_slots
        return 0 in _layout(self.n, self.b)[0][level]

    def slot_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Padded slot of the t-th ordered token: ``[N]`` long."""
        return torch.tensor(_layout(self.n, self.b)[1], device=device)

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
    # k-d: one pass per level; tokens of a node stay contiguous, so a stable sort by value followed
    # by a stable sort by node id sorts inside every node at once.
    shape = TreeShape(n, b)
    perm = torch.arange(n, device=coords.device).expand(coords.shape[0], n)
    for level in range(shape.k):
        node_of = torch.repeat_interleave(torch.arange(b**level, device=coords.device),
                                          shape.counts(level).to(coords.device))  # [N]
        vals = coords[..., level % dx].gather(1, perm)  # [B, N]
        by_val = torch.argsort(vals, dim=1, stable=True)
        by_node = torch.argsort(node_of[by_val], dim=1, stable=True)
        perm = perm.gather(1, by_val.gather(1, by_node))
    return perm


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


def build_tree(enc: torch.Tensor, b: int, aggregator: Aggregator, ordering: str = "natural",
               coords: torch.Tensor | None = None, coord: int = 0, bptt: bool = False) -> Tree:
    """Order, pad and aggregate ``enc [B, N, D]`` into a :class:`Tree`.

    With ``bptt=False`` (the paper's default) the aggregator's input is detached at every level, so
    the encoder learns only through the read-out and the tree through the aggregator's own weights.
    """
    if enc.dim() != 3:
        raise ValueError(f"context encodings must be [B, N, D]; got shape {tuple(enc.shape)}")
    B, N, D = enc.shape
    if B == 0:
        raise ValueError("empty batch: B = 0")
    shape = TreeShape(N, b)
    perm = order_tokens(coords, N, b, ordering, coord, batch_size=B)  # [B, N]
    ordered = enc if ordering == "natural" else enc.gather(1, perm.unsqueeze(-1).expand(B, N, D))
    if N == shape.num_slots:  # no padding: the slots are the ordered tokens (no copy)
        tokens = ordered
    else:
        tokens = enc.new_zeros(B, shape.num_slots, D)
        tokens[:, shape.slot_index(enc.device)] = ordered  # [B, P*b^k, D]
    token_mask = shape.slot_mask(enc.device).expand(B, -1)  # [B, P*b^k]

    k, P = shape.k, shape.P
    # Masks are handed to the aggregator only where a level has padding (it depends on N alone).
    x = tokens.reshape(B * b**k, P, D)
    m = None if N == shape.num_slots else token_mask.reshape(B * b**k, P)
    nodes: list[torch.Tensor] = [enc.new_empty(0)] * (k + 1)
    masks: list[torch.Tensor] = [token_mask.new_empty(0)] * (k + 1)
    for level in range(k, -1, -1):
        node, nm = aggregator(x if bptt else x.detach(), m)  # [B*b^level, D]
        if nm is None:
            nm = torch.ones(B * b**level, dtype=torch.bool, device=enc.device)
        nodes[level], masks[level] = node.reshape(B, b**level, D), nm.reshape(B, b**level)
        if level > 0:
            x = node.reshape(B * b ** (level - 1), b, D)
            m = nm.reshape(B * b ** (level - 1), b) if shape.padded(level) else None
    return Tree(shape, tokens, token_mask, nodes, masks, perm)
